"""Where f's GPU time goes, kernel by kind, in a training step of the width-512 student.

profile_graphed_step.py found f at 38% MFU inside a bf16 + Triton-norm training step replayed from CUDA graphs
(forward 40-41%, backward 36-37%; issue 11 asks 40%). This says which kernels hold the rest: --steps training
steps (batch 128, 8x8 state, t1 = 1) run under torch.profiler, and every GPU kernel is summed by name and by
kind (convolution / GEMM kernels, Triton kernels, elementwise, reductions, copies, other). For the convolution
kind, the rate is f's 3x3 conv FLOPs per step (forward NFE x 1 + backward NFE x 2 evaluations, bench_student's
f_gflop) plus the two fp32 reference evaluations per solve of noise-aware control, over the kind's kernel time:
an upper bound of what f's convolutions reach (the stem's and head's convolutions are in the kind's time but
not its FLOPs, about 1% of them).

Kernels replayed from a CUDA graph are listed as the profiler sees them: where it does not trace inside graphs,
a "+graphs" option shows far fewer kernels than its eager twin and its kernel time is not the step's.

    PYTHONPATH=. python benchmarks/profile_kernels.py [--options ...] [--smoke]

--smoke: width 32, batch 16 on a CPU, where CPU operators stand in for kernels: plumbing only.
"""
import argparse
import collections
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_student import OPTIONS, f_gflop, matmul_rate, sync, warmed_student  # noqa: E402

from nodekd_ray.devices import describe_device  # noqa: E402

DEFAULT_OPTIONS = ["bf16+triton+nodekd+noise", "bf16+triton+nodekd+noise+graphs+pereval", "bf16+triton+nodekd+noise+graphs",
                   "tf32+nodekd+noise"]
KINDS = (   # first match wins; names lower-cased
    ("triton", ("triton",)),
    ("conv/gemm", ("conv", "gemm", "xmma", "cutlass", "sm90", "sm80", "wgrad", "dgrad", "fprop", "cudnn", "implicit")),
    ("reduce", ("reduce", "norm")),
    ("copy", ("copy", "memcpy", "memset", "cat")),
    ("elementwise", ("elementwise", "vectorized", "foreach")),
)


def kind(name: str) -> str:
    low = name.lower()
    return next((k for k, keys in KINDS if any(s in low for s in keys)), "other")


def profile_option(name: str, args, device, peak: float) -> None:
    model, step = warmed_student(OPTIONS[name], args, device)
    cfg = model.cfg
    f0, b0 = model.nfe_forward, model.nfe_backward
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync(device)
        wall = (time.perf_counter() - t0) / args.steps
    nfe_f, nfe_b = (model.nfe_forward - f0) / args.steps, (model.nfe_backward - b0) / args.steps
    by_name, by_kind = collections.Counter(), collections.Counter()
    calls = collections.Counter()
    for e in prof.events():
        if cuda and e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if not cuda and e.cpu_children:   # CPU smoke: leaf operators only
            continue
        us = e.time_range.elapsed_us() / args.steps
        by_name[e.name] += us
        calls[e.name] += 1
        by_kind[kind(e.name)] += us
    total = sum(by_kind.values())
    refs = 2 if cfg.step_control_used(cuda) == "noise-aware" else 0
    conv_flop = f_gflop(args.width) * args.batch * (nfe_f + 2 * nfe_b + refs) * 1e9
    print(f"{name}: step {1e3 * wall:.1f} ms (profiled), NFE {nfe_f:.1f}/{nfe_b:.1f}, kernel time {total / 1e3:.1f} ms "
          f"per step in {sum(calls.values()) / args.steps:.0f} kernels", flush=True)
    for k, us in by_kind.most_common():
        extra = ""
        if k == "conv/gemm" and us:
            extra = f"   f's conv FLOPs over this time: {conv_flop / (us / 1e6) / 1e12:.0f} TFLOP/s = " \
                    f"{100 * conv_flop / (us / 1e6) / 1e12 / peak:.1f}% of the matmul rate"
        print(f"    {k:<12} {us / 1e3:8.2f} ms {100 * us / max(total, 1e-9):5.1f}%{extra}")
    print(f"    top {args.top} kernels: ms per step, calls per step, us per call")
    for n, us in by_name.most_common(args.top):
        c = calls[n] / args.steps
        print(f"    {us / 1e3:8.2f} {c:6.0f} {us / c:8.1f}  [{kind(n)}] {n[:110]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="width 32, batch 16, 1 step on a CPU: plumbing only")
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--stem", type=int, default=64)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--t1", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--top", type=int, default=14)
    ap.add_argument("--options", nargs="+", default=DEFAULT_OPTIONS, choices=list(OPTIONS))
    args = ap.parse_args()
    if args.smoke:
        args.width, args.stem, args.batch, args.steps, args.warmup, args.top = 32, 16, 16, 1, 1, 5
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak = matmul_rate(device, 8192 if device.type == "cuda" else 256)
    print(f"device: {describe_device(device)}; torch {torch.__version__}; bf16 matmul rate {peak:.2f} TFLOP/s")
    for name in args.options:
        try:
            profile_option(name, args, device, peak)
        except Exception as e:  # noqa: BLE001 -- one option's failure is its line; the others run
            print(f"{name}: failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
