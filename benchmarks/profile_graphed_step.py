"""f's MFU inside a training step (issue 11: "at least 40% MFU inside the ODE function"), with and without
--cuda-graphs.

bench_student.py gives a training step's MFU and f's MFU timed apart from training; bench_graphs.py gives f's
kernels replayed from one graph. Neither says how fast f runs inside a real training step, where the solver's
arithmetic, its step control's host reads and the autograd engine sit between f's evaluations. This does:
the width-512 student (8x8 state, batch 128, t1 = 1, dopri5 1e-3) trains for --steps Adam steps on random
images, and every evaluation of f with autograd (each one a graph replay under --cuda-graphs) is bracketed by
CUDA events, on the stream, in the forward and in the backward:

    forward   an event before the call of f and one after it (a replayed slot: its input copies and its graph)
    backward  an event when the gradient reaches f's output, before f's backward starts, and one when f's
              backward has handed back the gradient for its input state (f's parameter-gradient sums included)

f's time is the sum of those intervals on the GPU; its FLOPs are the 3x3 convs' (bench_student.f_gflop) per
evaluation forward and twice that per evaluation backward (an evaluation in a rejected step has no backward).
"MFU in f" is their ratio over the bf16 matmul rate measured in this run; "f share" is f's time over the step's
wall time; "rest" is the step's time outside f's intervals (solver, step control, stem, head, loss, Adam and
any GPU idle time). Evaluations of f without autograd (the first-step rule's probe, noise-aware control's
reference) are not bracketed: they are counted in "rest". A step timed with the events is compared with one
timed without them (the events' own cost).

    PYTHONPATH=. python benchmarks/profile_graphed_step.py [--options ...] [--smoke]

--smoke: width 32, batch 16 on a CPU, where there are no CUDA graphs (f runs eagerly) and the brackets are host
clocks: plumbing only.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_student import OPTIONS, f_gflop, matmul_rate, stem_head_gflop, sync, warmed_student  # noqa: E402

import nodekd_ray.speed.dopri5 as speed_dopri5  # noqa: E402
from nodekd_ray.devices import describe_device  # noqa: E402

DEFAULT_OPTIONS = ["bf16+triton+nodekd+noise+graphs", "bf16+triton+nodekd+noise+graphs+pereval", "bf16+triton+nodekd+noise",
                   "tf32+triton+nodekd+noise+graphs", "tf32+triton+nodekd+noise+graphs+pereval", "tf32+nodekd+noise+graphs",
                   "tf32+nodekd+noise"]


class Clock:
    """Marks on the device's stream (CUDA events) or, on a CPU, host times; ``seconds(a, b)`` between two."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a


class _Bracket(torch.autograd.Function):
    """Identity whose backward marks the clock: on f's output, the start of f's backward; on f's input state,
    its end (the input's gradient is complete once f's backward has run)."""

    @staticmethod
    def forward(ctx, x, log, key):
        ctx.log, ctx.key = log, key
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.log.append((ctx.key, ctx.log.clock.mark()))
        return grad, None, None


class Log(list):
    def __init__(self, clock):
        super().__init__()
        self.clock = clock
        self.on = False
        self.evaluations = 0


def bracketed(f, log: Log):
    """f for the solver, each evaluation with autograd bracketed in ``log`` while ``log.on``."""

    def evaluate(t, h):
        if not log.on or not torch.is_grad_enabled() or not h.requires_grad:
            return f(t, h)
        k = log.evaluations
        log.evaluations += 1
        h = _Bracket.apply(h, log, ("backward_end", k))
        start = log.clock.mark()
        out = f(t, h)
        log.append((("forward", k), start, log.clock.mark()))
        return _Bracket.apply(out, log, ("backward_start", k))

    return evaluate


def f_times(log: Log) -> tuple[float, int, float, int]:
    """(forward seconds, forward evaluations, backward seconds, backward evaluations) from the marks."""
    fwd, n_fwd, starts, bwd, n_bwd = 0.0, 0, {}, 0.0, 0
    for entry in log:
        (kind, k) = entry[0]
        if kind == "forward":
            fwd += log.clock.seconds(entry[1], entry[2])
            n_fwd += 1
        elif kind == "backward_start":
            starts[k] = entry[1]
        else:
            bwd += log.clock.seconds(starts.pop(k), entry[1])
            n_bwd += 1
    if starts:
        raise RuntimeError(f"{len(starts)} evaluations' backward started and never ended")
    return fwd, n_fwd, bwd, n_bwd


def profile(name: str, args, device, peak: float) -> dict:
    model, step = warmed_student(OPTIONS[name], args, device)
    log = Log(Clock(device))
    solver = speed_dopri5.dopri5
    speed_dopri5.dopri5 = lambda f, *a, **kw: solver(bracketed(f, log), *a, **kw)

    def timed(steps: int) -> float:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        return (time.perf_counter() - t0) / steps

    try:
        f0, b0 = model.nfe_forward, model.nfe_backward
        plain = timed(args.steps)
        nfe_f = (model.nfe_forward - f0) / args.steps
        nfe_b = (model.nfe_backward - b0) / args.steps
        log.on = True
        f1, b1 = model.nfe_forward, model.nfe_backward
        marked = timed(args.steps)
        marked_nfe = ((model.nfe_forward - f1) / args.steps, (model.nfe_backward - b1) / args.steps)
        sync(device)
        fwd, n_fwd, bwd, n_bwd = f_times(log)
    finally:
        speed_dopri5.dopri5 = solver
    gf = f_gflop(args.width) * args.batch
    f_flop = (gf * n_fwd + 2 * gf * n_bwd) * 1e9
    step_flop = (gf * (nfe_f + 2 * nfe_b) + 3 * stem_head_gflop(args.width, args.stem) * args.batch) * 1e9
    f_s = (fwd + bwd) / args.steps
    return {"step_s": plain, "step_s_marked": marked, "nfe_forward": nfe_f, "nfe_backward": nfe_b,
            "nfe_marked": marked_nfe, "bracketed_forward": n_fwd / args.steps, "bracketed_backward": n_bwd / args.steps,
            "f_forward_s": fwd / args.steps, "f_backward_s": bwd / args.steps, "f_s": f_s,
            "mfu_step": step_flop / plain / 1e12 / peak, "mfu_f": f_flop / (fwd + bwd) / 1e12 / peak,
            "mfu_f_forward": gf * n_fwd * 1e9 / fwd / 1e12 / peak,
            "mfu_f_backward": 2 * gf * n_bwd * 1e9 / bwd / 1e12 / peak if n_bwd else float("nan"),
            "f_share": f_s / marked, "rest_s": marked - f_s,
            "graph_solves": model._graphs.solves if model._graphs is not None else 0}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="width 32, batch 16, 2 steps on a CPU: plumbing only")
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--stem", type=int, default=64)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--t1", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=10, help="timed training steps per option, with and without events")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--options", nargs="+", default=DEFAULT_OPTIONS, choices=list(OPTIONS))
    args = ap.parse_args()
    if args.smoke:
        args.width, args.stem, args.batch, args.steps, args.warmup = 32, 16, 16, 2, 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak = matmul_rate(device, 8192 if device.type == "cuda" else 256)
    print(f"device: {describe_device(device)}; torch {torch.__version__}")
    print(f"NODE width {args.width}, batch {args.batch}, 8x8 state, t1 {args.t1:g}, dopri5 1e-3; {args.steps} steps; "
          f"bf16 matmul rate (MFU denominator) {peak:.2f} TFLOP/s")
    print(f"  {'option':<42} {'step ms':>8} {'marked':>7} {'NFE f/b':>9} {'f fwd ms':>9} {'f bwd ms':>9} "
          f"{'f share':>8} {'rest ms':>8} {'MFU step':>9} {'MFU f':>6} {'(fwd':>6} {'bwd)':>6}", flush=True)
    for name in args.options:
        try:
            r = profile(name, args, device, peak)
        except Exception as e:  # noqa: BLE001 -- a capture that fails: its row says so, the others run
            print(f"  {name}: failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}", flush=True)
            continue
        print(f"  {name:<42} {1e3 * r['step_s']:8.1f} {1e3 * r['step_s_marked']:7.1f} "
              f"{r['nfe_forward']:4.1f}/{r['nfe_backward']:<4.1f} {1e3 * r['f_forward_s']:9.2f} "
              f"{1e3 * r['f_backward_s']:9.2f} {100 * r['f_share']:7.1f}% {1e3 * r['rest_s']:8.2f} "
              f"{100 * r['mfu_step']:8.1f}% {100 * r['mfu_f']:5.1f}% {100 * r['mfu_f_forward']:5.1f}% "
              f"{100 * r['mfu_f_backward']:5.1f}%", flush=True)
        if r["bracketed_forward"] and device.type == "cuda" and OPTIONS[name].get("cuda_graphs") \
                and not r["graph_solves"]:
            print(f"  {name}: no solve used the graphs", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
