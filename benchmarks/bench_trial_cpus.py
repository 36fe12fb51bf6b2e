"""Claim (issue 26, defect 6): a trial that asks Ray for the node's CPUs (--cpus-per-trial auto: a GPU
node's CPUs per GPU) instead of 1 spends a smaller share of its step on data loading, because Ray caps a
task's torch threads at its CPUs (OMP_NUM_THREADS). On a GPU node the batches are cut on the GPU and the
CPU threads matter less; this measures the CPU path, where both the loader and the step run on threads.

How: one training step of a NODE student (width --width, batch 128, t1 = 1, Adam) on batches from the
device-resident loader (nodekd_ray.data.Batches: random crop pad 4 + flip), timed apart: the loader's
next batch, then forward + backward + update. torch threads 1 (a trial holding 1 CPU: before) and
os.cpu_count() (a trial holding the node's CPUs: after), alternated, --reps rounds each, in one run.

    .venv/bin/python benchmarks/bench_trial_cpus.py [--width 64] [--reps 3] [--out FILE.json]
"""
import argparse
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from nodekd_ray.data import Batches, load_dataset
from nodekd_ray.checkpoints import build_model


def measure(threads: int, width: int, steps: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    train, _ = load_dataset("synthetic", synthetic_sizes=(128 * (steps + 1), 10))
    batches = Batches(train, batch_size=128, shuffle=True, crop_padding=4, flip=True, seed=0, drop_last=True)
    model = build_model("node", node=dict(width=width, stem_channels=16, t1=1.0))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    it = iter(batches)
    load_s = step_s = 0.0
    for i in range(steps + 1):
        t0 = time.perf_counter()
        b = next(it)
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(b.x), b.y).backward()
        opt.step()
        t2 = time.perf_counter()
        if i:                                    # the first step warms up
            load_s, step_s = load_s + t1 - t0, step_s + t2 - t1
    return {"threads": threads, "load_ms": 1e3 * load_s / steps, "step_ms": 1e3 * step_s / steps,
            "load_share": load_s / (load_s + step_s)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None, help="write the rows as JSON")
    args = ap.parse_args()
    n = os.cpu_count() or 1
    rows = []
    for _ in range(args.reps):
        for threads in (1, n):
            rows.append(measure(threads, args.width, args.steps))
    print(f"{platform.processor() or platform.machine()}, {n} CPUs, torch {torch.__version__}, NODE width {args.width}, "
          f"batch 128, {args.steps} timed steps, {args.reps} rounds")
    summary = {}
    for threads in (1, n):
        mine = [r for r in rows if r["threads"] == threads]
        summary[threads] = {k: statistics.median(r[k] for r in mine) for k in ("load_ms", "step_ms", "load_share")}
        s = summary[threads]
        print(f"  {threads} thread(s): loader {s['load_ms']:7.1f} ms, step {s['step_ms']:8.1f} ms, "
              f"loader share {100 * s['load_share']:4.1f}%  (median of {len(mine)})")
    a, b = summary[1], summary[n]
    print(f"{n} threads vs 1: loader {a['load_ms'] / b['load_ms']:.2f}x faster, whole step "
          f"{(a['load_ms'] + a['step_ms']) / (b['load_ms'] + b['step_ms']):.2f}x faster")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"cpus": n, "width": args.width, "rows": rows, "summary": summary}, f, indent=1)


if __name__ == "__main__":
    main()
