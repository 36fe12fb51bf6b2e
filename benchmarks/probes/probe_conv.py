"""Where the student's GPU time goes (issue 11's notes): one 512 -> 512 3x3 conv on the student's
state (batch 128, 8x8), and the ODE function f, forward and forward+backward, for each arithmetic
(IEEE fp32, TF32, bf16), memory format (NCHW, channels_last) and cuDNN algorithm choice
(heuristic, the default; ``cudnn.benchmark``, which times the candidates once per shape), in
TFLOP/s timed with CUDA events (median of --reps). Then a profile of one bf16 training step of the
student: GPU kernel time against wall time (launch-bound if the GPU idles), and the top kernels.

    python benchmarks/probes/probe_conv.py          # GPU only
"""
import argparse
import statistics

import torch
import torch.nn.functional as F

from nodekd_ray.models import NODEConfig, NeuralODE, ODEFunc


def timed(fn, reps):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def arith(mode):
    conv = torch.backends.cudnn.conv
    conv.fp32_precision = "ieee" if mode == "fp32" else "tf32"


def backward_precision(B, C, dev):
    """Relative error of one conv's dgrad and wgrad in fp32 against fp64, by where cuDNN's fp32
    mode is set: does the backward read the mode at forward time or at backward time?"""
    conv = torch.backends.cudnn.conv
    x = torch.randn(B, C, 8, 8, device=dev, dtype=torch.float64)
    w = torch.randn(C, C, 3, 3, device=dev, dtype=torch.float64) * 0.02
    g = torch.randn(B, C, 8, 8, device=dev, dtype=torch.float64)
    ref = torch.autograd.grad(F.conv2d(x.requires_grad_(), w.requires_grad_(), padding=1), [x, w], g)
    print("fp32 conv gradients against fp64 (dgrad, wgrad relative error):")
    for label, fwd_mode, bwd_mode, det in (("tf32 throughout", "tf32", "tf32", False),
                                           ("ieee throughout", "ieee", "ieee", False),
                                           ("ieee in forward only", "ieee", "tf32", False),
                                           ("ieee in backward only", "tf32", "ieee", False),
                                           ("ieee throughout, deterministic", "ieee", "ieee", True)):
        torch.backends.cudnn.deterministic = det
        xf, wf = x.float().requires_grad_(), w.float().requires_grad_()
        conv.fp32_precision = fwd_mode
        y = F.conv2d(xf, wf, padding=1)
        conv.fp32_precision = bwd_mode
        gx, gw = torch.autograd.grad(y, [xf, wf], g.float())
        print(f"  {label:<32} {float((gx - ref[0]).norm() / ref[0].norm()):.2e}  "
              f"{float((gw - ref[1]).norm() / ref[1].norm()):.2e}")
    torch.backends.cudnn.deterministic = False
    conv.fp32_precision = "tf32"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--only-backward-precision", action="store_true")
    args = ap.parse_args()
    dev = torch.device("cuda")
    B, C = args.batch, args.width
    backward_precision(B, C, dev)
    if args.only_backward_precision:
        return
    flop = 2 * B * 64 * C * C * 9
    print(f"one conv {C}->{C} 3x3 on ({B},{C},8,8): {flop / 1e9:.1f} GFLOP forward; TFLOP/s (fwd | fwd+bwd)")
    for bench in (False, True):
        torch.backends.cudnn.benchmark = bench
        for mode in ("fp32", "tf32", "bf16"):
            for cl in (False, True):
                arith(mode)
                dt = torch.bfloat16 if mode == "bf16" else torch.float32
                fmt = torch.channels_last if cl else torch.contiguous_format
                x = torch.randn(B, C, 8, 8, device=dev, dtype=dt).contiguous(memory_format=fmt).requires_grad_()
                w = (torch.randn(C, C, 3, 3, device=dev, dtype=dt) * 0.02).contiguous(memory_format=fmt).requires_grad_()
                g = torch.randn(B, C, 8, 8, device=dev, dtype=dt).contiguous(memory_format=fmt)
                fwd = timed(lambda: F.conv2d(x, w, padding=1), args.reps)
                both = timed(lambda: torch.autograd.backward(F.conv2d(x, w, padding=1), g), args.reps)
                print(f"  benchmark={bench!s:<5} {mode:<4} {'NHWC' if cl else 'NCHW'}  "
                      f"{flop / fwd / 1e12:7.1f} | {3 * flop / both / 1e12:7.1f}")
    print("f (4 GN-ReLU-conv layers, aligned time conv): TFLOP/s fwd+bwd")
    for bench in (False, True):
        torch.backends.cudnn.benchmark = bench
        for prec in ("fp32", "tf32", "bf16"):
            for cl in (False, True):
                torch.manual_seed(0)
                f = ODEFunc(C, precision=prec).to(dev)
                fmt = torch.channels_last if cl else torch.contiguous_format
                if cl:
                    f.to(memory_format=fmt)
                h = torch.randn(B, C, 8, 8, device=dev).contiguous(memory_format=fmt).requires_grad_()
                t = torch.tensor(0.5, device=dev)
                arith(prec)   # the backward runs outside f's forward context
                dt = timed(lambda: f(t, h).sum().backward(), args.reps)
                print(f"  benchmark={bench!s:<5} {prec:<4} {'NHWC' if cl else 'NCHW'}  {12 * flop / dt / 1e12:7.1f}"
                      f"   ({dt * 1e3:.2f} ms)")
    torch.backends.cudnn.benchmark = False
    arith("tf32")
    for bench in (False, True):
        torch.backends.cudnn.benchmark = bench
        torch.manual_seed(0)
        m = NeuralODE(NODEConfig(width=C, precision="bf16", channels_last=True, solver_impl="torchdiffeq",
                                    step_control="plain")).to(dev)
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)
        x = torch.rand(B, 3, 32, 32, device=dev)
        y = torch.randint(0, 10, (B,), device=dev)

        def step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), y).backward()
            opt.step()

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        from torch.profiler import ProfilerActivity, profile

        n0 = m.nfe_forward
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            import time
            t0 = time.perf_counter()
            step()
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        ev = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        gpu = sum(e.device_time for e in ev) / 1e6
        print(f"bf16+cl training step, cudnn.benchmark={bench}: wall {wall * 1e3:.1f} ms, GPU kernels {gpu * 1e3:.1f} ms "
              f"({len(ev)} kernels, NFE {m.nfe_forward - n0})")
        print(prof.key_averages().table(sort_by="device_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
