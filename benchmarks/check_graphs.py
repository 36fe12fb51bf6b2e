"""Claim: NODEConfig.cuda_graphs (nodekd_ray/speed/cuda_graphs.py) trains the student as the eager path does, on a GPU.

How: for each row, two students, one eager and one with cuda_graphs, take training steps (forward through
dopri5, backward, an Adam update) on the same random batch, then one on a smaller batch (a second set of
graphs) and one more on the first batch (its graphs reused). Before each step the graphed student gets the
eager one's weights, copied into its parameters in place (the graphs must read the updated values): the
two then compute the same function, and each step compares the logits, every parameter's gradient
(relative error, the largest over parameters) and the NFE. (Comparing two trajectories instead measures
Adam's amplification of rounding: its first updates are lr x sign(g), and a first H200 run of this check
saw 3e-7 gradient differences at equal weights grow to 6e-3 three steps later.) The bound is each precision's: the two paths compute the
same function with the same kernels, except that the graphed path prepares each conv's weights per
evaluation where the eager one prepares them once per solve, which changes bf16 gradient sums' order.
Then two forward passes before one backward must raise (the slots' guard). Exits 1 if any check fails.

    PYTHONPATH=. python benchmarks/check_graphs.py [--width 512 --batch 128]
    PYTHONPATH=. python benchmarks/check_graphs.py --smoke      # CPU: f runs eagerly there (plumbing only)
"""
import argparse
import sys
import time

import torch
import torch.nn.functional as F

from nodekd_ray.devices import describe_device
from nodekd_ray.models import NODEConfig, NeuralODE

ROWS = {
    "tf32": dict(precision="tf32"),
    "bf16": dict(precision="bf16"),
    "tf32+triton": dict(precision="tf32", norm_impl="triton"),
    "bf16+triton": dict(precision="bf16", norm_impl="triton"),
    "bf16+cl+triton": dict(precision="bf16", norm_impl="triton", channels_last=True),
    "tf32+cl+triton": dict(precision="tf32", norm_impl="triton", channels_last=True),
}
for _name in ("tf32+triton", "bf16+triton"):   # graphs of the parameters per evaluation, not a solve's shared inputs
    ROWS[_name + "+pereval"] = dict(ROWS[_name], graph_inputs="per-evaluation")
DEFAULT_ROWS = ["tf32", "bf16", "tf32+triton", "bf16+triton"]
BOUND_LOGITS = {"tf32": 1e-4, "bf16": 1e-2}
BOUND_GRAD = {"tf32": 1e-3, "bf16": 5e-2}


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def step(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    f0, b0 = model.nfe_forward, model.nfe_backward
    logits = model(x)
    F.cross_entropy(logits, y).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    return logits.detach(), grads, (model.nfe_forward - f0, model.nfe_backward - b0)


def check_row(name: str, opts: dict, args, device) -> bool:
    torch.manual_seed(0)
    opts = dict(opts)
    cfg = dict(width=args.width, stem_channels=args.stem, t1=args.t1, **opts)
    eager = NeuralODE(NODEConfig(**cfg)).to(device)
    graphed = NeuralODE(NODEConfig(**cfg, cuda_graphs=True)).to(device)
    graphed.load_state_dict(eager.state_dict())
    opt_e = torch.optim.Adam(eager.parameters(), lr=1e-3)
    opt_g = torch.optim.Adam(graphed.parameters(), lr=1e-3)
    twin = NeuralODE(NODEConfig(**cfg)).to(device) if args.detail else None   # eager against eager: the noise floor
    opt_t = torch.optim.Adam(twin.parameters(), lr=1e-3) if twin is not None else None
    x = torch.rand(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    low = "bf16" if opts["precision"] == "bf16" else "tf32"
    ok = True
    for i, n in enumerate([args.batch, args.batch, args.batch // 2, args.batch]):
        graphed.load_state_dict(eager.state_dict())    # in place: the same parameter storage
        if twin is not None:
            twin.load_state_dict(eager.state_dict())
        t0 = time.perf_counter()
        le, ge, nfe_e = step(eager, opt_e, x[:n], y[:n])
        t_e = time.perf_counter() - t0
        t0 = time.perf_counter()
        lg, gg, nfe_g = step(graphed, opt_g, x[:n], y[:n])
        t_g = time.perf_counter() - t0
        r_logits = rel(lg, le)
        worst = max(gg, key=lambda k: rel(gg[k], ge[k]))
        r_grad = rel(gg[worst], ge[worst])
        good = r_logits <= BOUND_LOGITS[low] and r_grad <= BOUND_GRAD[low] and nfe_e == nfe_g
        ok &= good
        g = graphed._graphs
        slots = len(g.slots) if g is not None else 0
        print(f"  {name:<12} step {i} batch {n:>4}  logits {r_logits:.2e}  grads {r_grad:.2e} ({worst})  "
              f"NFE {nfe_e[0]}/{nfe_e[1]} vs {nfe_g[0]}/{nfe_g[1]}  slots {slots:>3}  "
              f"s eager {t_e:.3f} graphed {t_g:.3f}  {'ok' if good else 'FAIL'}", flush=True)
        if twin is not None:
            lt, gt, _ = step(twin, opt_t, x[:n], y[:n])
            top = sorted(gg, key=lambda k: -rel(gg[k], ge[k]))[:6]
            print(f"      eager twin: logits {rel(lt, le):.2e}; gradients graphed / twin against eager: "
                  + ", ".join(f"{k} {rel(gg[k], ge[k]):.1e}/{rel(gt[k], ge[k]):.1e}" for k in top), flush=True)
    try:
        first = graphed(x).sum()
        graphed(x).sum().backward()
        first.backward()
        guard, said = device.type != "cuda", "ran (f runs eagerly on a CPU)"
    except RuntimeError as e:
        guard, said = "cuda_graphs" in str(e), f"refused: {str(e)[:60]}..."
    print(f"  {name:<12} two forwards before one backward: {said if guard else 'NOT REFUSED'}")
    return ok and guard


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--stem", type=int, default=64)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--t1", type=float, default=1.0)
    ap.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, choices=list(ROWS))
    ap.add_argument("--smoke", action="store_true", help="width 32, batch 8, no Triton rows: a CPU")
    ap.add_argument("--detail", action="store_true", help="per step, a second eager student's differences too "
                                                          "(the noise floor) and the 6 worst parameters")
    ap.add_argument("--pereval", action="store_true", help="the rows, then their +pereval rows (graphs of the "
                                                           "parameters per evaluation)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.pereval:
        args.rows = args.rows + [r + "+pereval" for r in args.rows if r + "+pereval" in ROWS and r + "+pereval" not in args.rows]
    if args.smoke:
        args.width, args.stem, args.batch = 32, 16, 8
        args.rows = [r for r in args.rows if "triton" not in r]
    print(f"device: {describe_device(device)}; torch {torch.__version__}")
    print(f"width {args.width}, batch {args.batch}, t1 {args.t1:g}; eager against cuda_graphs, same weights; bounds "
          f"logits {BOUND_LOGITS}, gradients {BOUND_GRAD}")
    ok = all([check_row(name, ROWS[name], args, device) for name in args.rows])
    print("all checks passed" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
