"""Claim: with f's convolutions in bf16 (or TF32), f's rounding noise, not dopri5's truncation error, sets
the step sizes on smooth dynamics, and dopri5 takes more steps than in fp32 for no accuracy; step_control
"noise-aware" (nodekd_ray/speed/dopri5.py) takes them out of the error ratio and gets fp32's step count back,
with the solution's error still at the level of bf16 rounding.

How: the student (width 512, batch 128, t1 = 1 on a GPU; --smoke: width 64, batch 32) on seeded random images
and labels, after 0, 1 and 3 Adam steps on that batch (bench_student.py measures after 3: its 14 fp32 against
20 bf16 forward NFE), for several seeds. For each state, each row takes one training step (forward through
dopri5, backward; no update) with the same weights:

    fp32                IEEE fp32, torchdiffeq's step control: the step count exact arithmetic needs
    tf32 / tf32+noise   TF32 convolutions, plain / noise-aware step control (GPU only: a CPU has no TF32)
    bf16 / bf16+noise   f's convolutions under bf16 autocast, plain / noise-aware

every row with solver_impl "nodekd". Per row: forward and backward NFE of the step, the fp32 reference
evaluations (noise-aware: 2 per solve), the first step's error ratio as measured and its noise part r_n,
and the error of the logits and of the ODE's final state against a float64 solve at rtol = atol = 1e-8
(the state's error is what the tolerance governs; plain and noise-aware should both sit at bf16's rounding
level). --time adds seconds per training step (median of --reps, on a GPU by default): the figure that says
whether 2 reference evaluations per solve cost less than the steps they save.

    python benchmarks/bench_step_control.py              # on a GPU machine
    python benchmarks/bench_step_control.py --width 64 --stem 16 --batch 32 --warmup 0 3    # a CPU (bf16 autocast)
    python benchmarks/bench_step_control.py --smoke      # plumbing only
    ... --checkpoint runs/s.pt --dataset digits          # a trained student on test batches instead
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from nodekd_ray.devices import describe_device
from nodekd_ray.speed.dopri5 import dopri5
from nodekd_ray.models import NODEConfig, NeuralODE

ROWS = {
    "fp32": dict(precision="fp32"),
    "tf32": dict(precision="tf32"),
    "tf32+noise": dict(precision="tf32", step_control="noise-aware"),
    "bf16": dict(precision="bf16"),
    "bf16+noise": dict(precision="bf16", step_control="noise-aware"),
}
GPU_ONLY = ("tf32", "tf32+noise")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def copy_with(model: NeuralODE, **opts) -> NeuralODE:
    m = NeuralODE(NODEConfig(**{**model.cfg.__dict__, **opts}), model.fc.out_features)
    m.load_state_dict(model.state_dict())
    return m.to(model.fc.weight.device)


def tight(model: NeuralODE, x):
    """float64 logits and final state of the same model, dopri5 at rtol = atol = 1e-8."""
    ref = copy_with(model, precision="fp32", step_control="plain").double()
    with torch.no_grad():
        h0 = ref.stem(ref.normalize(x.double()))
        h = dopri5(ref.func, h0, 0.0, float(ref.cfg.t1), rtol=1e-8, atol=1e-8)
        return ref.fc(F.relu(ref.head_norm(h)).mean(dim=(2, 3))), h


def measure(model: NeuralODE, x, y, ref, args, device) -> dict:
    f0, b0, r0 = model.nfe_forward, model.nfe_backward, model.func.nfe_reference
    logits = model(x)
    F.cross_entropy(logits, y).backward()
    out = {"nfe_f": model.nfe_forward - f0, "nfe_b": model.nfe_backward - b0,
           "ref_evals": model.func.nfe_reference - r0, "logits_err": rel(logits.detach(), ref[0])}
    stats = {}
    with torch.no_grad(), model.func.solving():   # the same solve once more, for its step statistics and state
        h0 = model.stem(model.normalize(x))
        h = dopri5(model.func, h0, 0.0, float(model.cfg.t1), rtol=model.cfg.rtol, atol=model.cfg.atol,
                   reference=model.func.reference if model.cfg.step_control == "noise-aware" else None, stats=stats)
    out.update(state_err=rel(h, ref[1]), ratio0=stats["ratios"][0], noise0=stats["noise_ratios"][0],
               steps=f"{stats['accepted']}/{stats['rejected']}")
    if args.time:
        times = []
        for _ in range(args.reps):
            model.zero_grad(set_to_none=True)
            sync(device)
            t0 = time.perf_counter()
            F.cross_entropy(model(x), y).backward()
            sync(device)
            times.append(time.perf_counter() - t0)
        out["step_s"] = statistics.median(times)
    return out


def warm_states(args, device):
    """(label, model, x, y): seeded random batches, after each --warmup count of Adam steps in fp32."""
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        model = NeuralODE(NODEConfig(width=args.width, stem_channels=args.stem, t1=args.t1, precision="fp32",
                                     solver_impl="nodekd", step_control="plain")).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        x = torch.rand(args.batch, 3, 32, 32, device=device)
        y = torch.randint(0, 10, (args.batch,), device=device)
        done = 0
        for warm in sorted(args.warmup):
            for _ in range(warm - done):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                opt.step()
            done = warm
            yield f"seed {seed}, {warm} steps", model, x, y


def load_student(args, device) -> NeuralODE:
    """--checkpoint's student with solver_impl nodekd; its width, stem and t1 replace the arguments'."""
    from nodekd_ray.checkpoints import load_checkpoint

    model, _ = load_checkpoint(args.checkpoint, expect_arch="node")
    args.width, args.stem, args.t1 = model.cfg.width, model.cfg.stem_channels, model.cfg.t1
    return copy_with(model, solver_impl="nodekd", step_control="plain").to(device)


def checkpoint_states(args, model, device):
    from nodekd_ray.data import load_dataset

    test = load_dataset(args.dataset, root=args.data_root)[1]
    for b in range(args.batches):
        sl = slice(b * args.batch, (b + 1) * args.batch)
        if sl.start >= len(test.labels):
            break
        x = test.images[sl].to(device).float() / 255
        yield f"{args.dataset} test batch {b}", model, x, test.labels[sl].to(device)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--stem", type=int, default=64)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--t1", type=float, default=1.0)
    ap.add_argument("--warmup", type=int, nargs="+", default=[0, 1, 3], help="Adam steps before each measurement")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--time", action=argparse.BooleanOptionalAction, default=None,
                    help="time a training step per row (default: on a GPU)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--checkpoint", default=None, help="a trained student: measure on --dataset's test batches instead")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--data-root", default="data")
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--smoke", action="store_true", help="width 16, batch 4, 1 seed, no warm-up: plumbing only")
    args = ap.parse_args(argv)
    if args.smoke:
        args.width, args.stem, args.batch, args.seeds, args.warmup, args.reps = 16, 8, 4, 1, [0], 1
    device = torch.device(args.device)
    args.time = device.type == "cuda" if args.time is None else args.time
    rows = [r for r in args.rows if device.type == "cuda" or r not in GPU_ONLY]
    student = load_student(args, device) if args.checkpoint else None
    print(f"device: {describe_device(device)}; torch {torch.__version__}; threads {torch.get_num_threads()}")
    print(("trained student " + args.checkpoint + ": " if student else "") + f"student width {args.width}, batch {args.batch}, t1 {args.t1:g}, dopri5 rtol = atol = 1e-3, "
          f"solver_impl nodekd; errors against float64 at 1e-8")
    states = checkpoint_states(args, student, device) if student else warm_states(args, device)
    results = {r: [] for r in rows}
    for label, model, x, y in states:
        ref = tight(model, x)
        print(f"\n{label}")
        print(f"  {'row':11s} {'NFE f/b':>8s} {'fp32 ref':>8s} {'acc/rej':>7s} {'ratio 1':>8s} {'noise 1':>8s} "
              f"{'state err':>9s} {'logit err':>9s}" + ("  s/step" if args.time else ""))
        for r in rows:
            m = copy_with(model, **ROWS[r])
            out = measure(m, x, y, ref, args, device)
            results[r].append(out)
            print(f"  {r:11s} {out['nfe_f']:3d}/{out['nfe_b']:<4d} {out['ref_evals']:8d} {out['steps']:>7s} "
                  f"{out['ratio0']:8.1e} {out['noise0']:8.1e} {out['state_err']:9.2e} {out['logits_err']:9.2e}"
                  + (f"  {out['step_s']:.4f}" if args.time else ""))
    print(f"\nmean over {len(results[rows[0]])} states")
    for r in rows:
        rs = results[r]
        mean = lambda k: statistics.fmean(o[k] for o in rs)     # noqa: E731
        print(f"  {r:11s} NFE f/b {mean('nfe_f'):5.1f}/{mean('nfe_b'):<5.1f} state err {mean('state_err'):.2e}  "
              f"logit err {mean('logits_err'):.2e}" + (f"  {mean('step_s'):.4f} s/step" if args.time else ""))
    for low in ("tf32", "bf16"):
        if low in results and f"{low}+noise" in results:
            a, b = results[low], results[f"{low}+noise"]
            nf = sum(o["nfe_f"] for o in a) / sum(o["nfe_f"] for o in b)
            line = f"{low}: plain / noise-aware forward NFE {nf:.2f}x"
            if args.time:
                line += f", time per step {sum(o['step_s'] for o in a) / sum(o['step_s'] for o in b):.2f}x"
            fewer = sum(o2["nfe_f"] < o1["nfe_f"] for o1, o2 in zip(a, b))
            more = sum(o2["nfe_f"] > o1["nfe_f"] for o1, o2 in zip(a, b))
            print(line + f"; fewer NFE in {fewer} of {len(a)} states, more in {more}")


if __name__ == "__main__":
    main()
