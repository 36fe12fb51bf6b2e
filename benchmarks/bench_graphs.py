"""How much of the student's GPU time is kernel launches: f and a solve of f, eager against CUDA graph replay.

Issue 11 asks for 40% MFU inside f. The H100 run of 2026-11-24 found a training step bound by launches
(5835 kernels; 80 ms of kernel time in a 114 ms step). This measures the ceiling that removing the launch
gaps would give, before building anything for it:

1. the cost of one launch: N tiny in-place adds, launched one by one from Python, against the same N adds
   replayed from one CUDA graph (per kernel, in microseconds);
2. f forward + backward at width 512, batch 128, 8x8 state (one call, which prepares its conv weights, as
   bench_student's "MFU f"), and a solve of f (``--f-solve`` evaluations under ``func.solving()``, then one
   backward, as bench_student's "MFU f-solve"), for tf32 and bf16 and each norm implementation: eager time,
   and the time of the same work captured once in a CUDA graph and replayed. Graph replay runs the same
   kernels with no host between them, so its rate is what f's kernels reach; eager / graph is what launches
   cost. MFU is over the bf16 matmul rate measured in this run (bench_student.matmul_rate).

A capture that fails prints its error on its row instead of a time. No solver arithmetic is timed here:
dopri5's step control reads the error ratio on the host once per step, so a whole adaptive solve cannot be
one graph. ``--smoke`` runs a width-32 copy on a CPU with eager rows only (plumbing).

    PYTHONPATH=. python benchmarks/bench_graphs.py [--smoke]
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_student import f_gflop, matmul_rate  # noqa: E402

from nodekd_ray.devices import describe_device  # noqa: E402
from nodekd_ray.models import ODEFunc  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def graphed(fn, device):
    """fn captured in one CUDA graph (after warm-up on a side stream, as PyTorch's docs do it); returns replay."""
    s = torch.cuda.Stream(device)
    s.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def launch_cost(device, n: int, repeats: int) -> tuple:
    x = torch.zeros(16, device=device)

    def adds():
        for _ in range(n):
            x.add_(1.0)

    eager = median_time(adds, device, repeats) / n
    graph = median_time(graphed(adds, device), device, repeats) / n if device.type == "cuda" else float("nan")
    return eager, graph


def f_work(precision: str, norm_impl: str, args, device):
    torch.manual_seed(0)
    f = ODEFunc(args.width, precision=precision, norm_impl=norm_impl).to(device)
    h = torch.randn(args.batch, args.width, 8, 8, device=device, requires_grad=True)
    t = torch.tensor(0.5, device=device)

    def one():
        f(t, h).sum().backward()

    def solve():
        with f.solving():
            sum(f(t, h).sum() for _ in range(args.f_solve)).backward()

    return {"f": (one, 1), "f-solve": (solve, args.f_solve)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--f-solve", type=int, default=20, help="evaluations in a solve of f (default 20)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--launches", type=int, default=2000)
    ap.add_argument("--precisions", nargs="+", default=["tf32", "bf16"])
    ap.add_argument("--norm-impls", nargs="+", default=["torch", "triton"])
    ap.add_argument("--smoke", action="store_true", help="width 32, batch 4, 3 evaluations: CPU plumbing")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        args.width, args.batch, args.f_solve, args.repeats, args.launches = 32, 4, 3, 3, 100
        args.norm_impls = ["torch"]
    print(f"device: {describe_device(device)}; torch {torch.__version__}")
    peak = matmul_rate(device, 8192 if device.type == "cuda" else 256)
    print(f"measured bf16 matmul rate (MFU denominator): {peak:.4g} TFLOP/s")
    eager, graph = launch_cost(device, args.launches, max(3, args.repeats // 4))
    print(f"one launch of a tiny add: eager {eager * 1e6:.2f} us, in a CUDA graph {graph * 1e6:.2f} us "
          f"({args.launches} adds)")
    gf = 3 * f_gflop(args.width) * args.batch      # forward + backward of one evaluation, GFLOP
    print(f"width {args.width}, batch {args.batch}, 8x8 state; f forward + backward {gf:.4g} GFLOP per "
          f"evaluation; f-solve: {args.f_solve} evaluations, one backward")
    print(f"  {'precision':9} {'norms':7} {'work':8} {'eager ms/eval':>14} {'MFU':>6} "
          f"{'graph ms/eval':>14} {'MFU':>6} {'eager/graph':>12}")
    for precision in args.precisions:
        for impl in args.norm_impls:
            for name, (fn, evals) in f_work(precision, impl, args, device).items():
                fn()
                fn()
                e = median_time(fn, device, args.repeats) / evals
                row = f"  {precision:9} {impl:7} {name:8} {e * 1e3:14.3f} {gf / e / 1e3 / peak:6.1%} "
                if device.type != "cuda":
                    print(row + "(no CUDA graphs on a CPU)")
                    continue
                try:
                    g = median_time(graphed(fn, device), device, args.repeats) / evals
                except Exception as exc:   # noqa: BLE001 - a failed capture is a result to print, not a crash
                    print(row + f"capture failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
                    torch.cuda.synchronize(device)
                    continue
                print(row + f"{g * 1e3:14.3f} {gf / g / 1e3 / peak:6.1%} {e / g:11.2f}x")


if __name__ == "__main__":
    main()
