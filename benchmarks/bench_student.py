"""Claim (issue 11): on an H100 the bf16 student path trains at least 2.5x the images/s of the
fp32 path, and reaches at least 40% of the GPU's measured bf16 matmul rate inside the ODE function.

How: the width-512 NODE student (8x8 state, batch 128, t1 = 1, dopri5, rtol = atol = 1e-3) on
random images and labels, one Adam step per iteration (forward through the solver, backward
through it, update), for each option in one run:

    (torch.compile of f's norms and bf16 norms were measured slower than their baselines and removed on
    2026-12-05; their rows stay in the dated result files)
    fp32-concat          IEEE fp32, the time channel concatenated (513 -> 512 convs): the baseline
    fp32                 IEEE fp32, the aligned time convolution (512 -> 512 plus t x response)
    tf32                 TF32 convolutions (PyTorch's default for cuDNN convs on GPUs)
    bf16                 f's convolutions under bf16 autocast; state, solver and loss in fp32
    bf16+cl              bf16 and channels_last
    tf32+nodekd          tf32 and solver_impl "nodekd" (nodekd_ray/speed/dopri5.py: the same dopri5 steps as
                         torchdiffeq's with fewer device operations; see benchmarks/bench_solver.py)
    bf16+nodekd          bf16 and solver_impl "nodekd"
    tf32+nodekd+recompute  tf32, solver_impl "nodekd" and recompute (f's GroupNorm + ReLU recomputed in
                         the backward: about half the activation memory per NFE)
    tf32+triton          tf32 and norm_impl "triton" (nodekd_ray/speed/fused_norm.py: GroupNorm + ReLU in one
                         Triton kernel each way; on a CPU outside Triton's interpreter, PyTorch's ops run)
    bf16+triton          bf16 and norm_impl "triton" (no casts around the norms: the kernel reads and
                         writes bf16, with fp32 statistics)
    bf16+triton+nodekd   bf16, norm_impl "triton" and solver_impl "nodekd"
    tf32+nodekd+noise    tf32, solver_impl "nodekd" and step_control "noise-aware" (dopri5 measures f's rounding
                         noise against 2 IEEE fp32 evaluations per solve and does not shrink its steps for it;
                         see benchmarks/bench_step_control.py)
    bf16+nodekd+noise    bf16, solver_impl "nodekd" and step_control "noise-aware" (TF32 reference evaluations)
    bf16+triton+nodekd+noise  the same with norm_impl "triton"
    bf16+cl+...          the same with channels_last (NHWC: on an H100 one bf16 512 -> 512 conv ran forward +
                         backward at 367 TFLOP/s NHWC against 241 NCHW, benchmarks/results/h100-2026-11-24/probe.txt)
    ...+graphs+pereval   the same with graphs that take the parameters per evaluation (graph_inputs
                         "per-evaluation"), not a solve's shared inputs (the default where f's fused path allows:
                         Triton norms, NCHW; speed/cuda_graphs.GraphSolveInputs)
    ...+graphs           the same with cuda_graphs (nodekd_ray/speed/cuda_graphs.py: a solve's evaluations of f with
                         autograd replayed from CUDA graphs; GPUs only, eager on a CPU). "MFU f" and "MFU f-solve"
                         time f eagerly and are left out of these rows (benchmarks/bench_graphs.py times f in
                         graphs); "peak GiB" includes the graphs' memory

For each: training images/s and its ratio to the baseline, forward/backward NFE per step as
counted by the model, FLOPs per function evaluation per image (counted from the layer shapes),
and MFU: achieved FLOP rate over the bf16 matmul rate measured on this device in this run. MFU is
given for the whole step ("step") and for the ODE function alone, timed apart from the solver's
bookkeeping: "f" is one forward+backward call of f on a fixed state, which also prepares the convs'
weights and hands back its own parameter gradients; "f-solve" is --f-solve evaluations (20) under one
solve's shared weights followed by one backward through them all, as a training step's solve runs f. NFE differs between options only through
rounding: a bf16 f that makes dopri5 reject steps shows here as more NFE per step.

    .venv/bin/python benchmarks/bench_student.py            # on a GPU machine
    .venv/bin/python benchmarks/bench_student.py --smoke    # width 32, batch 16, on CPU; plumbing only
    ... --out costs.json    # also write the measured rates for `--dry-run --costs costs.json`

On a CPU, TF32 does not exist (tf32 == fp32) and bf16 autocast is emulated slowly: the CPU figures
say nothing about a GPU.
"""
import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

from nodekd_ray.devices import describe_device
from nodekd_ray.models import NODEConfig, NeuralODE

# A row's solver and step control are torchdiffeq's and plain unless its name says "nodekd" or "noise" (the
# rows predate NODEConfig's "auto" defaults, which pick nodekd and, on a GPU, noise-aware step control)
BASELINE = dict(solver_impl="torchdiffeq", step_control="plain")
OPTIONS = {
    "fp32-concat": dict(precision="fp32", time_conv="concat"),
    "fp32": dict(precision="fp32"),
    "tf32": dict(precision="tf32"),
    "bf16": dict(precision="bf16"),
    "bf16+cl": dict(precision="bf16", channels_last=True),
    "tf32+nodekd": dict(precision="tf32", solver_impl="nodekd"),
    "bf16+nodekd": dict(precision="bf16", solver_impl="nodekd"),
    "tf32+nodekd+recompute": dict(precision="tf32", solver_impl="nodekd", recompute=True),
    "tf32+triton": dict(precision="tf32", norm_impl="triton"),
    "bf16+triton": dict(precision="bf16", norm_impl="triton"),
    "bf16+triton+nodekd": dict(precision="bf16", norm_impl="triton", solver_impl="nodekd"),
    "tf32+nodekd+noise": dict(precision="tf32", solver_impl="nodekd", step_control="noise-aware"),
    "bf16+nodekd+noise": dict(precision="bf16", solver_impl="nodekd", step_control="noise-aware"),
    "bf16+triton+nodekd+noise": dict(precision="bf16", norm_impl="triton", solver_impl="nodekd",
                                     step_control="noise-aware"),
    "tf32+nodekd+noise+graphs": dict(precision="tf32", solver_impl="nodekd", step_control="noise-aware",
                                     cuda_graphs=True),
    "bf16+nodekd+noise+graphs": dict(precision="bf16", solver_impl="nodekd", step_control="noise-aware",
                                     cuda_graphs=True),
    "tf32+triton+nodekd+noise+graphs": dict(precision="tf32", norm_impl="triton", solver_impl="nodekd",
                                            step_control="noise-aware", cuda_graphs=True),
    "bf16+triton+nodekd+noise+graphs": dict(precision="bf16", norm_impl="triton", solver_impl="nodekd",
                                            step_control="noise-aware", cuda_graphs=True),
    "bf16+cl+triton+nodekd+noise": dict(precision="bf16", channels_last=True, norm_impl="triton",
                                        solver_impl="nodekd", step_control="noise-aware"),
    "bf16+cl+triton+nodekd+noise+graphs": dict(precision="bf16", channels_last=True, norm_impl="triton",
                                               solver_impl="nodekd", step_control="noise-aware", cuda_graphs=True),
    "tf32+cl+triton+nodekd+noise+graphs": dict(precision="tf32", channels_last=True, norm_impl="triton",
                                               solver_impl="nodekd", step_control="noise-aware", cuda_graphs=True),
    "bf16+cl+nodekd+noise+graphs": dict(precision="bf16", channels_last=True, solver_impl="nodekd",
                                        step_control="noise-aware", cuda_graphs=True),
}
for _name in ("tf32+triton+nodekd+noise+graphs", "bf16+triton+nodekd+noise+graphs", "bf16+cl+triton+nodekd+noise+graphs"):
    OPTIONS[_name + "+pereval"] = dict(OPTIONS[_name], graph_inputs="per-evaluation")


def make_student(opts: dict, **cfg) -> NeuralODE:
    """The student of an OPTIONS row (on the CPU)."""
    return NeuralODE(NODEConfig(**cfg, **{**BASELINE, **opts}))


def f_gflop(width: int, layers: int = 4, hw: int = 64, time_channel: bool = True) -> float:
    """GFLOP of one evaluation of f per image: 2 x MACs of its 3x3 convs (norms and ReLUs left out)."""
    return layers * 2 * 9 * (width + int(time_channel)) * width * hw / 1e9


def stem_head_gflop(width: int, stem: int, classes: int = 10) -> float:
    macs = 9 * 3 * stem * 32 * 32 + 16 * stem * 2 * stem * 16 * 16 + 16 * 2 * stem * width * 8 * 8 + width * classes
    return 2 * macs / 1e9


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(device, n: int, dtype=torch.bfloat16, reps: int = 10) -> float:
    """Measured dense matmul rate in TFLOP/s (the MFU denominator)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12


def train_step(model, batch: int, device, optimizer=torch.optim.Adam, **opt_kw):
    """One training step of ``model`` on a fixed random batch of CIFAR-shaped images (forward, backward,
    update: the benchmarks' unit of work), as a function of no arguments."""
    opt = optimizer(model.parameters(), **(opt_kw or dict(lr=1e-3)))
    x = torch.rand(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def warmed_student(opts: dict, args, device):
    """(model, its training step) for an OPTIONS row at args' width, stem, horizon and batch, seeded, after
    args.warmup steps (the first captures CUDA graphs, tunes kernels, compiles)."""
    torch.manual_seed(0)
    model = make_student(opts, width=args.width, stem_channels=args.stem, t1=args.t1).to(device)
    step = train_step(model, args.batch, device)
    for _ in range(args.warmup):
        step()
    sync(device)
    return model, step


def bench(opts: dict, args, device) -> dict:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model, step = warmed_student(opts, args, device)
    cfg = model.cfg
    f0, b0 = model.nfe_forward, model.nfe_backward
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    dt = (time.perf_counter() - t0) / args.steps
    nfe_f = (model.nfe_forward - f0) / args.steps
    nfe_b = (model.nfe_backward - b0) / args.steps
    gf = f_gflop(args.width)
    step_gflop = args.batch * (gf * (nfe_f + 2 * nfe_b) + 3 * stem_head_gflop(args.width, args.stem))
    peak_gib = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    row = {"images_per_s": args.batch / dt, "step_s": dt, "nfe_forward": nfe_f, "nfe_backward": nfe_b,
           "step_tflops": step_gflop / dt / 1e3, "peak_gib": peak_gib}
    if cfg.cuda_graphs:   # f alone below would run eagerly: not this row's f
        return dict(row, f_tflops=float("nan"), f_solve_tflops=float("nan"))

    # f alone: forward + backward on a fixed state, as the solver calls it
    h = torch.randn(args.batch, args.width, 8, 8, device=device, requires_grad=True)
    if cfg.channels_last:
        h = h.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    t = torch.tensor(0.5, device=device)
    for _ in range(args.warmup):
        model.func(t, h).sum().backward()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.f_reps):   # each call prepares its conv weights, as a one-evaluation solve
        model.func(t, h).sum().backward()
    sync(device)
    f_dt = (time.perf_counter() - t0) / args.f_reps

    # f in a solve: args.f_solve evaluations sharing the solve's prepared conv weights (and, with the Triton
    # norms, the solve's parameter-gradient sums), then one backward through all of them, as a training step's
    # solve runs f; no solver arithmetic between them. One call above also prepares the weights and hands back
    # its own parameter gradients; in training that is done once per solve, not once per evaluation.
    def solve_of_f():
        with model.func.solving():
            sum(model.func(t, h).sum() for _ in range(args.f_solve)).backward()

    solve_of_f()
    sync(device)
    reps = max(1, args.f_reps // args.f_solve)
    t0 = time.perf_counter()
    for _ in range(reps):
        solve_of_f()
    sync(device)
    f_solve_dt = (time.perf_counter() - t0) / (reps * args.f_solve)
    return dict(row, f_tflops=3 * gf * args.batch / f_dt / 1e3, f_solve_tflops=3 * gf * args.batch / f_solve_dt / 1e3)


def teacher_rate(args, device) -> float:
    """Achieved training TFLOP/s of a ResNet20 (the teachers' rate for cost plans)."""
    from nodekd_ray.checkpoints import build_model
    from nodekd_ray.schedule import RESNET_GFLOP

    torch.manual_seed(0)
    model = build_model("resnet20").to(device)
    step = train_step(model, args.batch, device, torch.optim.SGD, lr=0.1, momentum=0.9)
    for _ in range(args.warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    dt = (time.perf_counter() - t0) / args.steps
    return 3 * RESNET_GFLOP * 18 * args.batch / dt / 1e3


MEMORY_VARIANTS = {   # how the backward pass is made: plain backpropagation (torchdiffeq's dopri5), the same with
    "backprop": {},   # nodekd's dopri5 and f's GroupNorm + ReLU recomputed, and the adjoint method; at tf32,
    "nodekd": dict(solver_impl="nodekd"),   # and then at bf16 with PyTorch's norms and with the Triton kernels
    "nodekd+recompute": dict(solver_impl="nodekd", recompute=True),
    "adjoint": dict(adjoint=True),
    "bf16+nodekd": dict(precision="bf16", solver_impl="nodekd"),
    "bf16+nodekd+triton": dict(precision="bf16", solver_impl="nodekd", norm_impl="triton"),
}
CPU_MEMORY_SKIPPED = ("bf16+nodekd+triton",)   # on a CPU PyTorch's ops stand in for the kernels: not their bytes


def memory(args, device, t1: float, variant: dict) -> dict:
    """Peak memory of one training step (forward through dopri5, backward) of a freshly initialised
    student: torch.cuda.max_memory_allocated on a GPU; on a CPU the bytes autograd saves for the
    backward pass (saved-tensor hooks), which is what grows with NFE. NFE at initialisation, not
    after training: a trained student's NFE (in the records) scales the plain-backprop figure."""
    torch.manual_seed(0)
    model = NeuralODE(NODEConfig(width=args.width, stem_channels=args.stem, t1=t1,
                                 **{**BASELINE, **variant})).to(device)
    x = torch.rand(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
    except torch.OutOfMemoryError:
        return {"nfe_forward": model.nfe_forward, "gib": float("inf"), "what": "out of memory"}
    if device.type == "cuda":
        sync(device)
        return {"nfe_forward": model.nfe_forward, "gib": (torch.cuda.max_memory_allocated(device) - base) / 2**30,
                "what": "peak allocated"}
    return {"nfe_forward": model.nfe_forward, "gib": sum(saved.values()) / 2**30, "what": "saved for backward"}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="width 32, batch 16, 2 timed steps: runs on a CPU")
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--stem", type=int, default=64)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--t1", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=10, help="timed training steps per option")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--f-reps", type=int, default=50, help="timed forward+backward calls of f alone")
    ap.add_argument("--f-solve", type=int, default=20,
                    help="evaluations of f per timed solve of f alone (MFU f-solve; 20: the forward NFE of a "
                         "training step at tf32 and bf16 on an H100)")
    ap.add_argument("--options", nargs="+", default=list(OPTIONS), choices=list(OPTIONS))
    ap.add_argument("--memory", nargs="*", type=float, default=None, metavar="T1",
                    help="also measure one training step's memory at these horizons (default 1 100 500), for "
                         "each of MEMORY_VARIANTS: plain backpropagation, with nodekd's dopri5, with it and "
                         "recompute, the adjoint method, and bf16 with PyTorch's or the Triton norms")
    ap.add_argument("--out", help="write the measured rates here (JSON) for --dry-run --costs")
    args = ap.parse_args()
    if args.smoke:
        args.width, args.stem, args.batch, args.steps, args.warmup, args.f_reps, args.f_solve = 32, 16, 16, 2, 1, 3, 3
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # on a CPU, 256: bf16 matmuls there run at ~1 GFLOP/s without AMX (1024 took 27 s of a 43 s smoke run),
    # and a CPU's MFU is not a figure this benchmark reports
    peak = matmul_rate(device, 8192 if device.type == "cuda" else 256)
    print(f"device: {describe_device(device)}; torch {torch.__version__}; threads {torch.get_num_threads()}")
    print(f"NODE width {args.width}, batch {args.batch}, 8x8 state, t1 {args.t1:g}, dopri5 1e-3; "
          f"f: {f_gflop(args.width):.3f} GFLOP per evaluation per image")
    print(f"measured bf16 matmul rate (MFU denominator): {peak:.2f} TFLOP/s")
    rows = {}
    print(f"  {'option':<42} {'img/s':>9} {'x base':>7} {'NFE f/b':>9} {'TFLOP/s':>8} {'MFU step':>9} {'MFU f':>7} "
          f"{'MFU f-solve':>11} {'peak GiB':>9}", flush=True)
    for name in args.options:   # a row as soon as it is measured (a run cut short keeps its rows)
        try:
            r = rows[name] = bench(OPTIONS[name], args, device)
        except Exception as e:  # noqa: BLE001 -- e.g. torch.compile without a compiler: report, go on
            print(f"  {name}: failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
            continue
        base = rows.get("fp32-concat")
        ratio = r["images_per_s"] / base["images_per_s"] if base else float("nan")
        print(f"  {name:<42} {r['images_per_s']:9.1f} {ratio:7.2f} {r['nfe_forward']:4.1f}/{r['nfe_backward']:<4.1f} "
              f"{r['step_tflops']:8.3f} {100 * r['step_tflops'] / peak:8.1f}% {100 * r['f_tflops'] / peak:6.1f}% "
              f"{100 * r['f_solve_tflops'] / peak:10.1f}% {r['peak_gib']:9.2f}", flush=True)
    if args.memory is not None:
        print(f"memory of one training step at batch {args.batch} (fresh weights):")
        for t1 in args.memory or (1.0, 100.0, 500.0):
            for name, variant in MEMORY_VARIANTS.items():
                if device.type != "cuda" and name in CPU_MEMORY_SKIPPED:
                    continue
                m = memory(args, device, t1, variant)
                print(f"  t1 {t1:>5g}  {name:<16}  NFE {m['nfe_forward']:>4}  {m['gib']:8.3f} GiB {m['what']}")
    t_rate = teacher_rate(args, device)
    print(f"ResNet20 training, batch {args.batch}: {t_rate:.3f} TFLOP/s")
    if args.out:
        # the default student's solver at its default precision, tf32; its FLOPs count the forward NFE it takes.
        # Not the noise-aware row: a costs file's NFE (nfe_forward, or sweep.node_nfe_guess) are plain
        # control's, and noise-aware's fewer NFE per step would make its TFLOP/s lower, not its time. Without
        # either row no student rate is written: another row's would misstate the default's cost
        name = next((n for n in ("tf32+nodekd", "tf32") if n in rows), None)
        rates = {"teacher": t_rate} if name is None else {"student": rows[name]["step_tflops"], "teacher": t_rate}
        with open(args.out, "w") as f:
            json.dump({"device": describe_device(device), "width": args.width, "batch": args.batch,
                       "bf16_matmul_tflops": peak, "options": rows, "rates": rates}, f, indent=1)
        print(f"rates (student: {'row ' + name if name else 'none: rows tf32+nodekd and tf32 not run'}) -> "
              f"{args.out}: use with --dry-run --costs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
