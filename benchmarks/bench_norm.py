"""Claim: nodekd_ray/speed/fused_norm.py's GroupNorm + ReLU (norm_impl "triton") runs f with fewer device
operations than PyTorch's ops, and in less time on a GPU.

Two measurements, PyTorch's norms (the baseline) against the Triton kernels in the same run:

  1. operations: what one evaluation of f, forward and backward, dispatches: the ATen operations
     that run a kernel on a GPU (views and allocations left out) plus the Triton kernel
     launches. Counts do not depend on width or batch, so a small f on a CPU gives a GPU's counts
     (there the kernels are counted, not run: Triton's interpreter dispatches ATen ops of its own).
     On a CPU the bf16 count is a lower bound of the difference: CPU autocast keeps group_norm in
     bf16, so the casts that CUDA's autocast puts around each norm appear only in a GPU's count. An ATen GroupNorm launches
     several CUDA kernels (statistics, fused parameters, the normalisation; more in its backward),
     which only a GPU profile shows (benchmarks/probes/probe_conv.py).
  2. time (a GPU only): GroupNorm + ReLU forward and backward on f's state, (batch, 512, 8, 8):
       fp32        F.group_norm + F.relu on fp32 against the kernel, fp32 in and out;
       bf16        what f runs under CUDA's autocast (the bf16 conv output cast up, group_norm and
                   the ReLU in fp32, the result cast down for the next conv) against the kernel,
                   bf16 in and out with fp32 statistics;
       ... and each in channels-last;
     and f alone (forward + backward of one evaluation) at tf32 and bf16 with each norm_impl.

    python benchmarks/bench_norm.py                   # on a GPU machine: counts and times
    .venv/bin/python benchmarks/bench_norm.py         # on a CPU: the counts only

Times are medians over --repeats calls after warm-up, the two implementations alternating.
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_solver import VIEWS, CountOps  # noqa: E402

from nodekd_ray.speed import fused_norm  # noqa: E402
from nodekd_ray.devices import describe_device  # noqa: E402
from nodekd_ray.models import ODEFunc  # noqa: E402

IMPLS = ("torch", "triton")
ALLOCATIONS = {"empty", "empty_like", "empty_strided"}   # no kernel: the caching allocator's work


def count_f(device, precision: str, width: int = 32, batch: int = 2) -> dict:
    """{impl: (ATen ops that launch kernels, Triton launches, op counter)} for one more evaluation of f,
    forward and backward, in a solve: a solve of 3 evaluations less one of 2, so that the per-solve
    preparation of each conv's weights (ODEFunc.solving) drops out."""
    rows = {}
    for impl in IMPLS:
        torch.manual_seed(0)
        f = ODEFunc(width, precision=precision, norm_impl=impl).to(device)
        h = torch.randn(batch, width, 8, 8, device=device, requires_grad=True)
        t = torch.tensor(0.5, device=device)
        cot = torch.randn_like(h)

        def solve(evals: int):
            fused_norm.LAUNCHES.clear()
            with f.solving(), CountOps() as c:   # each evaluation's output given a cotangent, as in a solve
                torch.autograd.backward([f(t, h) for _ in range(evals)], [cot] * evals)
            return c.ops, sum(fused_norm.LAUNCHES.values())

        solve(1)   # warm-up: kernels compiled
        kernels = fused_norm._kernels
        if device.type != "cuda":   # count the launches without running them (the interpreter's own ops)
            fused_norm._kernels = lambda interpret: (_NoLaunch(), _NoLaunch())
        try:
            (ops2, k2), (ops3, k3) = solve(2), solve(3)
        finally:
            fused_norm._kernels = kernels
        ops = {op: ops3[op] - ops2.get(op, 0) for op in ops3 if ops3[op] != ops2.get(op, 0)}
        rows[impl] = (sum(n for op, n in ops.items() if op not in VIEWS | ALLOCATIONS), k3 - k2, ops)
    return rows


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def timed(fns: dict, device, repeats: int) -> dict:
    for fn in fns.values():
        fn()
        fn()
    out = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            torch.cuda.synchronize(device)
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize(device)
            out[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in out.items()}


def norm_cases(batch: int, width: int, device):
    groups = max(1, min(32, width // 16))   # as f's GroupNorms (models._gn)
    gamma = torch.randn(width, device=device, requires_grad=True)
    beta = torch.randn(width, device=device, requires_grad=True)
    for low in (False, True):
        for cl in (False, True):
            x = torch.randn(batch, width, 8, 8, device=device, dtype=torch.bfloat16 if low else torch.float32)
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            x.requires_grad_()
            g = torch.randn_like(x)

            def baseline(x=x, g=g, low=low):
                y = F.relu(F.group_norm(x.float() if low else x, groups, gamma, beta, 1e-5))
                y = y.to(torch.bfloat16) if low else y   # autocast: the next conv's cast
                torch.autograd.backward(y, g)

            def fused(x=x, g=g):
                y = fused_norm.group_norm_act(x, groups, gamma, beta, 1e-5)
                torch.autograd.backward(y, g)

            yield f"{'bf16' if low else 'fp32'}{' channels-last' if cl else ''}", {"torch": baseline, "triton": fused}


def f_cases(batch: int, width: int, device):
    for precision in ("tf32", "bf16"):
        fns = {}
        for impl in IMPLS:
            torch.manual_seed(0)
            f = ODEFunc(width, precision=precision, norm_impl=impl).to(device)
            h = torch.randn(batch, width, 8, 8, device=device, requires_grad=True)
            t = torch.tensor(0.5, device=device)
            fns[impl] = lambda f=f, h=h, t=t: f(t, h).square().sum().backward()
        yield f"f {precision}", fns


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--smoke", action="store_true",
                    help="batch 2, width 32, 3 repeats for the GPU timings (the counts always use a small f)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.batch, args.width, args.repeats = 2, 32, 3
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not fused_norm.available():
        print("bench_norm.py: triton is not installed", file=sys.stderr)
        return 1
    if device.type == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    print(f"device: {describe_device(device)}; torch {torch.__version__}")
    print("operations of one f evaluation, forward + backward (ATen ops that launch kernels + Triton launches):")
    for precision in ("tf32", "bf16"):
        rows = count_f(device, precision)
        (ta, tl_, _), (ka, kl, _) = rows["torch"], rows["triton"]
        print(f"  {precision}: torch {ta} + {tl_}  triton {ka} + {kl}  ({(ka + kl) / (ta + tl_):.2f}x)")
        a, b = rows["torch"][2], rows["triton"][2]
        extra = {op: a.get(op, 0) - b.get(op, 0) for op in set(a) | set(b)
                 if op not in VIEWS | ALLOCATIONS and a.get(op, 0) != b.get(op, 0)}
        print(f"    ATen ops the kernels replace: {dict(sorted(extra.items()))}")
        if precision == "bf16" and device.type != "cuda":
            print("    (CPU autocast keeps group_norm in bf16: on a GPU, PyTorch's count has a cast on each side of "
                  "every norm more)")
    if device.type != "cuda":
        print("times: on a GPU only")
        return 0
    print(f"GroupNorm + ReLU forward + backward, ({args.batch}, {args.width}, 8, 8); median of {args.repeats}:")
    for name, fns in list(norm_cases(args.batch, args.width, device)) + list(f_cases(args.batch, args.width, device)):
        t = timed(fns, device, args.repeats)
        print(f"  {name:<22} torch {1e6 * t['torch']:8.1f} us   triton {1e6 * t['triton']:8.1f} us   "
              f"({t['torch'] / t['triton']:.2f}x)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
