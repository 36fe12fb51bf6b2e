"""Claim: nodekd_ray/speed/dopri5.py takes the same dopri5 steps as torchdiffeq with fewer device operations,
fewer device-to-host synchronisations and less time spent outside f per training step.

Three measurements, each torchdiffeq's dopri5 (the baseline) against solver_impl "nodekd" in the same run:

  1. operations: the ATen operations a student training step (forward through the solver and
     backward) dispatches, counted by a TorchDispatchMode: those that run a kernel on a GPU (views
     and autograd's detaches left out), the copy/fill operations among them, and the scalar reads
     (``_local_scalar_dense``: a device-to-host synchronisation each on a GPU).
     Counts do not depend on width or batch, so a small student on the CPU gives the GPU's counts.
  2. solver time: a training step whose f is one pointwise op (tanh(w * h + t)) on the real state,
     (batch, 512, 8, 8), so that the time is the solver's own: stage combinations, error norm,
     interpolation and their backward. Same steps in both (NFE printed).
  3. student time: a whole training step of the student (convolutional f, tf32) at --width/--batch.

    .venv/bin/python benchmarks/bench_solver.py                 # CPU: batch 32 for 2., width 64 for 3.
    .venv/bin/python benchmarks/bench_solver.py --batch 128 --width 512   # on a GPU machine
    .venv/bin/python benchmarks/bench_solver.py --smoke         # seconds; plumbing only

Times are medians over --repeats steps after a warm-up step; ratios compare the two in this run.
"""
import argparse
import collections
import statistics
import sys
import time

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from nodekd_ray.devices import describe_device
from nodekd_ray.models import NODEConfig, NeuralODE

IMPLS = ("torchdiffeq", "nodekd")
# views and autograd's detach of saved tensors: no kernel on a GPU, left out of the count
VIEWS = {"detach", "view", "_unsafe_view", "expand", "as_strided", "slice", "select", "t", "transpose", "permute",
         "unsqueeze", "squeeze", "alias", "view_as", "reshape", "_reshape_alias", "unbind", "split", "split_with_sizes",
         "lift_fresh", "_local_scalar_dense"}
COPIES = {"copy_", "fill_", "zero_", "zeros", "zeros_like", "empty", "clone", "new_zeros", "slice_backward",
          "select_backward", "_to_copy", "contiguous"}


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def student(width: int, impl: str, device, t1: float = 1.0):
    torch.manual_seed(0)
    return NeuralODE(NODEConfig(width=width, t1=t1, solver_impl=impl, step_control="plain")).to(device)


def train_step(model, x, y):
    model.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return loss


def count_ops(device):
    rows = {}
    x = torch.rand(4, 3, 32, 32, device=device)
    y = torch.arange(4, device=device) % 10
    for impl in IMPLS:
        m = student(16, impl, device)
        train_step(m, x, y)
        m.func.nfe = m.func.nfe_backward = 0
        with CountOps() as c:
            train_step(m, x, y)
        total = sum(n for op, n in c.ops.items() if op not in VIEWS)
        copies = sum(n for op, n in c.ops.items() if op in COPIES)
        rows[impl] = (total, copies, c.ops["_local_scalar_dense"], m.func.nfe, m.func.nfe_backward, c.ops)
    return rows


class Pointwise(nn.Module):
    """f(t, h) = tanh(w * h + t): one cheap op, so that a step's time is the solver's."""

    def __init__(self, channels: int):
        super().__init__()
        self.w = nn.Parameter(torch.full((channels, 1, 1), -0.5))
        self.nfe = 0

    def forward(self, t, h):
        self.nfe += 1
        return torch.tanh(self.w * h + t)


def solver_step(impl, f, h0, t1):
    from torchdiffeq import odeint

    from nodekd_ray.speed.dopri5 import dopri5

    f.zero_grad(set_to_none=True)
    if impl == "nodekd":
        h = dopri5(f, h0, 0.0, t1, rtol=1e-3, atol=1e-3)
    else:
        h = odeint(f, h0, torch.tensor([0.0, t1], device=h0.device), rtol=1e-3, atol=1e-3, method="dopri5")[-1]
    h.square().mean().backward()


def timed(fns: dict, device, repeats: int) -> dict:
    """Median seconds of each of fns, called in turn (A, B, A, B, ...) so that drift hits both alike."""
    for fn in fns.values():
        fn()   # warm-up
    out = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            out[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in out.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=None, help="batch of 2. and 3. (default: 128 on a GPU, 32 on a CPU)")
    ap.add_argument("--width", type=int, default=None, help="student width of 3. (default: 512 on a GPU, 64 on a CPU)")
    ap.add_argument("--t1", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=11, help="timed steps of each, alternating")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, 1 repeat: checks that the script runs")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    batch = args.batch or (4 if args.smoke else 128 if gpu else 32)
    width = args.width or (16 if args.smoke else 512 if gpu else 64)
    repeats = 1 if args.smoke else args.repeats
    print(f"device: {describe_device(device)}; torch {torch.__version__}")

    print("\n1. ATen operations per student training step (width 16, batch 4, t1 = 1; counts do not depend on size)")
    rows = count_ops(device)
    base = rows["torchdiffeq"][0]
    print(f"{'solver':<12} {'ops':>6} {'x base':>7} {'copy/fill':>10} {'scalar reads':>13} {'NFE fwd/bwd':>12}")
    for impl, (total, copies, syncs, nf, nb, _) in rows.items():
        print(f"{impl:<12} {total:>6} {total / base:>7.2f} {copies:>10} {syncs:>13} {f'{nf}/{nb}':>12}")
    for impl in IMPLS:
        top = ", ".join(f"{op} {n}" for op, n in rows[impl][5].most_common(16) if op not in VIEWS)
        print(f"  {impl}: {top}")

    print(f"\n2. solver time per training step: f = tanh(w h + t), state ({batch}, 512, 8, 8), t1 = {args.t1:g}")
    fs = {impl: Pointwise(512).to(device) for impl in IMPLS}
    h0 = torch.randn(batch, 512, 8, 8, device=device, generator=torch.Generator(device).manual_seed(0))
    times = timed({impl: (lambda impl=impl: solver_step(impl, fs[impl], h0, args.t1)) for impl in IMPLS},
                  device, repeats)
    for impl in IMPLS:
        print(f"{impl:<12} {times[impl] * 1e3:9.1f} ms  x{times['torchdiffeq'] / times[impl]:.2f}  "
              f"NFE per step {fs[impl].nfe // (repeats + 1)}")

    print(f"\n3. student training step: width {width}, batch {batch}, t1 = {args.t1:g}, tf32, random images")
    x = torch.rand(batch, 3, 32, 32, device=device, generator=torch.Generator(device).manual_seed(1))
    y = torch.randint(0, 10, (batch,), device=device, generator=torch.Generator(device).manual_seed(2))
    models = {impl: student(width, impl, device, args.t1) for impl in IMPLS}
    times = timed({impl: (lambda impl=impl: train_step(models[impl], x, y)) for impl in IMPLS}, device, repeats)
    for impl, m in models.items():
        n = repeats + 1
        print(f"{impl:<12} {times[impl] * 1e3:9.1f} ms  {batch / times[impl]:8.1f} images/s  "
              f"x{times['torchdiffeq'] / times[impl]:.2f}  NFE fwd/bwd {m.func.nfe / n:.0f}/{m.func.nfe_backward / n:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
