"""Claim (issue 11): on a CUDA GPU, every student option computes the same function as an fp64
reference, within the error its arithmetic allows; and how many more evaluations dopri5 makes under
each (bf16 rounding noise near the tolerance makes it reject steps: 32 against 26 at initialisation).

How: the width-512 student (batch 128, 8x8 state), fresh random weights and inputs drawn anew for
each check, on the GPU. The reference is the same model in float64 on the same GPU (cuDNN fp64
convs, the concatenated time channel). For each option the relative error ||out - ref|| / ||ref||
of
    f        one evaluation of the ODE function at a random t,
    df/dh    its vector-Jacobian product with a random cotangent (what backpropagation computes),
    df/dW    the same for the conv weights,
    logits   the whole model (stem, dopri5 over [0, t1], head),
and the forward NFE of that solve next to the reference's. Bounds: f 1e-4 / 1e-2 / 5e-2 for fp32 /
tf32 / bf16 (METHOD: fp32 far under 1e-3, tf32 near 3e-4 and bf16 operands 1e-3..1e-2 per product;
four layers compound them), its gradients 3e-3 / 5e-2 / 2e-1, logits 5e-3 / 5e-2 / 1e-1. The
gradient bounds are wide on purpose. On an H100 (2026-11-24), cuDNN's fp32 backward algorithms
left f's gradients 1e-4..1.3e-3 from fp64 while its forward was 6e-7 off; with cuDNN off they were
5e-7 off. The gradients of this f are also about 20x more sensitive to rounding than its output:
tf32 gives 6e-4 on f and 3e-2 on its gradients, bf16 7e-3 and 9e-2 (on a CPU too).
These bounds catch a wrong kernel, layout or time response (errors of order 1), not rounding.
Whether bf16 keeps accuracy is measured by training (benchmarks/digits_precision.sh). NaN never
passes. Exit 1 if any check fails.

    python benchmarks/check_gpu.py                # on a GPU machine
    python benchmarks/check_gpu.py --smoke        # width 32, batch 8, on CPU: plumbing only
"""
import argparse
import copy
import sys

import torch

from nodekd_ray.devices import describe_device
from nodekd_ray.models import NODEConfig, NeuralODE

OPTIONS = {
    "fp32-concat": dict(precision="fp32", time_conv="concat"),
    "fp32": dict(precision="fp32"),
    "tf32": dict(precision="tf32"),
    "bf16": dict(precision="bf16"),
    "bf16+cl": dict(precision="bf16", channels_last=True),
    "tf32+nodekd": dict(precision="tf32", solver_impl="nodekd"),          # the logits through dopri5.py
    "tf32+recompute": dict(precision="tf32", recompute=True),             # f's backward through _NormReluConv
    "bf16+recompute": dict(precision="bf16", recompute=True),
    "tf32+triton": dict(precision="tf32", norm_impl="triton"),           # nodekd_ray/speed/fused_norm.py's kernels
    "bf16+triton": dict(precision="bf16", norm_impl="triton"),
    "bf16+triton+cl": dict(precision="bf16", norm_impl="triton", channels_last=True),
    "bf16+triton+nodekd": dict(precision="bf16", norm_impl="triton", solver_impl="nodekd"),
    "tf32+triton+recompute": dict(precision="tf32", norm_impl="triton", recompute=True),
    "tf32+nodekd+noise": dict(precision="tf32", solver_impl="nodekd", step_control="noise-aware"),   # the logits
    "bf16+nodekd+noise": dict(precision="bf16", solver_impl="nodekd", step_control="noise-aware"),   # and NFE
    "bf16+triton+nodekd+noise": dict(precision="bf16", norm_impl="triton", solver_impl="nodekd",
                                     step_control="noise-aware"),
}
BOUND_F = {"fp32": 1e-4, "tf32": 1e-2, "bf16": 5e-2}
BOUND_GRAD = {"fp32": 3e-3, "tf32": 5e-2, "bf16": 2e-1}
BOUND_LOGITS = {"fp32": 5e-3, "tf32": 5e-2, "bf16": 1e-1}


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def build(base: NeuralODE, opts: dict, cfg: NODEConfig) -> NeuralODE:
    m = NeuralODE(NODEConfig(**{**cfg.__dict__, **opts}))
    m.load_state_dict(base.state_dict())
    if opts.get("channels_last"):
        m.func.to(memory_format=torch.channels_last)
    return m


def check(args, device, seed: int) -> list[tuple]:
    torch.manual_seed(seed)
    # rows name nodekd and noise-aware when they use them (NODEConfig's "auto" defaults would pick both)
    cfg = NODEConfig(width=args.width, stem_channels=args.stem, t1=args.t1, solver_impl="torchdiffeq",
                     step_control="plain")
    base = NeuralODE(NODEConfig(**{**cfg.__dict__, "precision": "fp32", "time_conv": "concat"}))
    ref = copy.deepcopy(base).double().to(device)
    h = torch.randn(args.batch, args.width, 8, 8, device=device, dtype=torch.float64)
    t = torch.rand((), device=device, dtype=torch.float64)
    cot = torch.randn_like(h)
    x = torch.rand(args.batch, 3, 32, 32, device=device, dtype=torch.float64)

    def f_and_grads(model, dtype, cl=False):
        hh = h.to(dtype)
        if cl:
            hh = hh.contiguous(memory_format=torch.channels_last)
        hh.requires_grad_()
        out = model.func(t.to(dtype), hh)
        gh, *gw = torch.autograd.grad(out, [hh, *[c.weight for c in model.func.convs]], cot.to(dtype))
        return out.detach(), gh, torch.cat([g.flatten() for g in gw])

    r_out, r_gh, r_gw = f_and_grads(ref, torch.float64)
    with torch.no_grad():
        ref.func.nfe = 0
        r_logits = ref(x)
        r_nfe = ref.nfe_forward
    rows = []
    for name, opts in OPTIONS.items():
        m = build(base, opts, cfg).to(device)
        out, gh, gw = f_and_grads(m, torch.float32, opts.get("channels_last", False))
        with torch.no_grad():
            m.func.nfe = 0
            logits = m(x.float())
        kind = "fp32" if opts["precision"] == "tf32" and device.type != "cuda" else opts["precision"]  # no TF32 on CPUs
        errs = {"f": rel(out, r_out), "df/dh": rel(gh, r_gh), "df/dW": rel(gw, r_gw), "logits": rel(logits, r_logits)}
        ok = all(e == e for e in errs.values()) and errs["f"] <= BOUND_F[kind] \
            and max(errs["df/dh"], errs["df/dW"]) <= BOUND_GRAD[kind] \
            and errs["logits"] <= BOUND_LOGITS[kind]
        agree = float((logits.argmax(1) == r_logits.argmax(1)).double().mean())
        rows.append((seed, name, errs, m.nfe_forward, r_nfe, agree, ok))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="width 32, batch 8: runs on a CPU")
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--stem", type=int, default=64)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--t1", type=float, default=1.0)
    ap.add_argument("--seeds", type=int, default=3, help="fresh weights and inputs per seed")
    args = ap.parse_args()
    if args.smoke:
        args.width, args.stem, args.batch, args.seeds = 32, 8, 8, 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device: {describe_device(device)}; torch {torch.__version__}")
    print(f"width {args.width}, batch {args.batch}, t1 {args.t1:g}; relative error against fp64 on the same device")
    print(f"  {'seed':>4} {'option':<24} {'f':>9} {'df/dh':>9} {'df/dW':>9} {'logits':>9} {'NFE':>4} {'ref':>4} {'argmax=':>7}")
    failed = 0
    for seed in range(args.seeds):
        for seed_, name, e, nfe, r_nfe, agree, ok in check(args, device, seed):
            failed += not ok
            print(f"  {seed_:>4} {name:<24} {e['f']:9.2e} {e['df/dh']:9.2e} {e['df/dW']:9.2e} {e['logits']:9.2e} "
                  f"{nfe:>4} {r_nfe:>4} {100 * agree:6.1f}%  {'ok' if ok else 'FAIL'}")
    print(f"{'all checks passed' if not failed else f'{failed} checks FAILED'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
