"""L-inf attacks on models that take pixels in [0, 1]: the paper's (section 4.3.1) and an audit.

The paper's attacks:
* PGD (Madry et al.): uniform random start in the eps-ball, step alpha = 1/255, projection.
* MI-FGSM (Dong et al.): momentum mu = 1, step 1/255, gradient divided by its per-image mean
  absolute value before it enters the momentum.
* FGSM: one step of size eps (its rows record 1 step whatever ``steps`` says).
Steps s = floor(min(255 eps + 4, 1.25 * 255 eps)) unless given. The update rules are those of
torchattacks (tests check equal adversarial images); the loss is cross-entropy summed over the
batch, so for a ResNet an image's gradient does not depend on which batch it is in (the sign,
and MI-FGSM's normalized gradient, are the same as with torchattacks' batch mean). For a dopri5
Neural ODE it does: the solver's step size is chosen for the whole batch, so the trajectory, and
with it each image's logits and gradient, depends on the other images in its batch. Attack
batches are therefore fixed (``batch_size`` in order), which makes results repeatable.

With alpha = 1/255 and s ~ 1.25 * 255 eps steps, PGD from a random start moves at most
1.25 eps: it cannot cross the eps-ball, and it is far from converged. Hence the audit
(AUDIT_ATTACKS, AuditConfig), which asks whether robustness survives stronger attacks:
* pgd-conv, pgd-long: PGD with the usual step size alpha = 2.5 eps / steps, 50 and 200 steps;
* pgd-restarts: pgd-conv from several random starts (robust only if every start fails);
* apgd-ce, apgd-dlr: AutoAttack's APGD with cross-entropy and DLR loss (torchattacks' ports);
* square: the Square attack, gradient-free (margin loss, AutoAttack's schedule);
* transfer-teacher, transfer-node: pgd-conv images made on another model (the KD teacher, the
  no-KD NODE of the same horizon and seed) and evaluated on this one;
* pgd-rk4: pgd-conv with gradients through a fixed-step rk4 copy of the model, evaluated on the
  dopri5 model (the adaptive solver's step-size control is where gradients could be obfuscated);
* tol-1e-1, tol-1e-3, tol-1e-5: the model evaluated and attacked (pgd-conv) with test-time
  rtol = atol set to that value (Carrara et al.), clean accuracy and NFE included;
* transfer-tol-1e-5: pgd-conv images made with gradients through a solve at rtol = atol = 1e-5,
  evaluated at the model's own tolerance (a cross-tolerance transfer: a loose tolerance that hid the
  gradient would show here as a stronger attack than the white-box one).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ConfigError, check_choice
from .checkpoints import nfe_totals
from .computation import as_reference, computation_info, reference_arithmetic

PAPER_ATTACKS = ("pgd", "mifgsm", "fgsm")
TOLERANCES = {"tol-1e-1": 1e-1, "tol-1e-3": 1e-3, "tol-1e-5": 1e-5}
CROSS_TOLERANCE = {"transfer-tol-1e-5": 1e-5}   # images made at this rtol = atol, evaluated at the model's own
AUDIT_ATTACKS = ("pgd-conv", "pgd-long", "pgd-restarts", "apgd-ce", "apgd-dlr", "square", "transfer-teacher",
                 "transfer-node", "pgd-rk4") + tuple(TOLERANCES) + tuple(CROSS_TOLERANCE)
ATTACKS = PAPER_ATTACKS + AUDIT_ATTACKS
# attacks that only mean something on a Neural ODE (a ResNet has no solver), and those that need
# a second model to make their images on
NODE_ONLY = ("transfer-node", "pgd-rk4") + tuple(TOLERANCES) + tuple(CROSS_TOLERANCE)
# What an attack computes on: "reference" (the default: computation.REFERENCE_COMPUTATION, IEEE fp32 for ResNets
# too, whatever the model was trained with) or "as-trained" (the model's own speed settings)
COMPUTATIONS = ("reference", "as-trained")
TRANSFER = ("transfer-teacher", "transfer-node")


@dataclass
class AuditConfig:
    """Strength of the audit attacks. Defaults are the usual full-strength settings; the sweeps'
    --smoke-test shrinks them."""
    steps: int = 50               # pgd-conv, pgd-restarts, transfer-*, pgd-rk4, tol-*
    long_steps: int = 200         # pgd-long
    step_factor: float = 2.5      # alpha = step_factor * eps / steps (Madry et al.'s rule of thumb)
    restarts: int = 5             # pgd-restarts
    apgd_steps: int = 100         # AutoAttack's APGD iterations
    square_queries: int = 1000    # AutoAttack runs 5000; 1000 keeps a CPU audit in minutes
    rk4_steps: int = 10           # pgd-rk4: fixed rk4 steps over [0, t1]

    def validate(self) -> "AuditConfig":
        for name in ("steps", "long_steps", "restarts", "apgd_steps", "square_queries", "rk4_steps"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                raise ConfigError(f"audit.{name}", f"must be an integer >= 1, got {v!r}")
        if not (isinstance(self.step_factor, (int, float)) and 0 < self.step_factor < 100):
            raise ConfigError("audit.step_factor", f"must be a number in (0, 100), got {self.step_factor!r}")
        return self


def attack_plan(attack: str, eps: float, audit: AuditConfig, steps: int | None = None,
                alpha: float = 1 / 255) -> dict:
    """What an attack does at eps: its steps (queries for square), step size and restarts."""
    if eps <= 0:
        return {"steps": 0, "alpha": 0.0, "restarts": 0}
    if attack in ("pgd", "mifgsm"):
        return {"steps": steps_for_eps(eps) if steps is None else steps, "alpha": alpha, "restarts": 1}
    if attack == "fgsm":
        return {"steps": 1, "alpha": eps, "restarts": 1}
    n = {"pgd-long": audit.long_steps, "apgd-ce": audit.apgd_steps, "apgd-dlr": audit.apgd_steps,
         "square": audit.square_queries}.get(attack, audit.steps)
    restarts = audit.restarts if attack == "pgd-restarts" else 1
    a = audit.step_factor * eps / n if attack not in ("apgd-ce", "apgd-dlr", "square") else 0.0
    return {"steps": n, "alpha": a, "restarts": restarts}


def steps_for_eps(eps: float) -> int:
    """The paper's s = floor(min(255 eps + 4, 1.25 * 255 eps)); eps in [0, 1] units."""
    e = round(eps * 255.0, 9)  # 8/255 * 255 is 7.999999999999999 in floating point
    return int(math.floor(min(e + 4.0, 1.25 * e) + 1e-9))


def parse_eps(text: str) -> list[float]:
    """'0,2/255,0.03' -> [0.0, 0.00784.., 0.03]. Every value must lie in [0, 1]."""
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "/" in part:
                num, den = part.split("/", 1)
                v = float(num) / float(den)
            else:
                v = float(part)
        except (ValueError, ZeroDivisionError):
            raise ConfigError("eps", f"cannot read {part!r}; give numbers in [0, 1] or fractions like 8/255") from None
        if not (0.0 <= v <= 1.0):
            raise ConfigError("eps", f"must be in [0, 1] (pixel units; 8/255 = 0.0314), got {part}")
        out.append(v)
    if not out:
        raise ConfigError("eps", "give at least one value, e.g. 0,2/255,4/255,8/255")
    return out


def _grad(model, x, y):
    x = x.detach().requires_grad_(True)
    loss = F.cross_entropy(model(x), y, reduction="sum")
    return torch.autograd.grad(loss, x)[0]


def _project(adv, x, eps):
    return torch.clamp(x + torch.clamp(adv - x, -eps, eps), 0.0, 1.0).detach()


def pgd(model, x, y, *, eps: float, alpha: float = 1 / 255, steps: int | None = None,
        random_start: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    steps = steps_for_eps(eps) if steps is None else steps
    adv = x.clone().detach()
    if random_start and eps > 0:
        noise = torch.rand(x.shape, generator=generator, device="cpu").to(x.device)  # seeded on CPU
        adv = torch.clamp(adv + (2 * noise - 1) * eps, 0.0, 1.0)
    for _ in range(steps):
        adv = _project(adv + alpha * _grad(model, adv, y).sign(), x, eps)
    return adv


def mifgsm(model, x, y, *, eps: float, alpha: float = 1 / 255, steps: int | None = None,
           decay: float = 1.0) -> torch.Tensor:
    steps = steps_for_eps(eps) if steps is None else steps
    adv = x.clone().detach()
    momentum = torch.zeros_like(x)
    for _ in range(steps):
        g = _grad(model, adv, y)
        g = g / g.abs().mean(dim=(1, 2, 3), keepdim=True)
        momentum = g + decay * momentum
        adv = _project(adv + alpha * momentum.sign(), x, eps)
    return adv


def fgsm(model, x, y, *, eps: float) -> torch.Tensor:
    return _project(x + eps * _grad(model, x, y).sign(), x, eps)


@dataclass
class SweepResult:
    """Per-sample arrays, one row per (eps, image), in the order of ``eps_list`` then images."""
    attack: str
    eps: np.ndarray            # (R,) float64
    steps: np.ndarray          # (R,) int32
    index: np.ndarray          # (R,) int64
    label: np.ndarray          # (R,) int64
    clean_correct: np.ndarray  # (R,) bool
    adv_correct: np.ndarray    # (R,) bool
    nfe: np.ndarray            # (R,) int64
    seconds: dict              # eps -> wall seconds
    plans: dict = field(default_factory=dict)    # eps -> attack_plan(...)
    solver: dict = field(default_factory=dict)   # solver, rtol, atol, time_input of the evaluated model (NODEs)
    computation: dict = field(default_factory=dict)  # "computation" and computation.computation_info of the evaluated model
    top_class_fraction: float = 0.0              # share of the most frequent clean prediction

    def robust_accuracy(self) -> dict[float, float]:
        return {float(e): float(self.adv_correct[self.eps == e].mean()) for e in np.unique(self.eps)}


def solver_info(model) -> dict:
    """The solver settings a Neural ODE is evaluated with ({} for a ResNet)."""
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        return {}
    return {"solver": cfg.solver, "rtol": float(cfg.rtol), "atol": float(cfg.atol), "time_input": cfg.time_input}


def with_solver(model, **changes):
    """A copy of a Neural ODE that integrates with other solver settings (same weights). A student
    trained with nodekd's dopri5 (solver_impl "nodekd", dopri5 only) is switched to torchdiffeq's
    implementation, with torchdiffeq's step control and without CUDA graphs, when the change is to another
    solver (the audit's rk4 gradients)."""
    m = copy.deepcopy(model)
    if changes.get("solver", m.cfg.solver) != "dopri5" or changes.get("adjoint", m.cfg.adjoint):
        changes.setdefault("solver_impl", "torchdiffeq")
        changes.setdefault("step_control", "plain")
        changes.setdefault("cuda_graphs", False)
    m.cfg = replace(m.cfg, **changes).validate()
    return m


def _nfe(*models) -> int:
    seen, total = set(), 0
    for m in models:
        if id(m) not in seen:
            seen.add(id(m))
            total += sum(nfe_totals(m))
    return total


def _adversarial(attack, grad_model, x, y, eps, plan, gen, seed):
    """Adversarial images for one batch, made with grad_model's gradients (or queries)."""
    if attack in ("pgd", "pgd-conv", "pgd-long", "pgd-restarts", "transfer-teacher", "transfer-node", "pgd-rk4") \
            or attack in TOLERANCES or attack in CROSS_TOLERANCE:
        return pgd(grad_model, x, y, eps=eps, alpha=plan["alpha"], steps=plan["steps"], generator=gen)
    if attack == "mifgsm":
        return mifgsm(grad_model, x, y, eps=eps, alpha=plan["alpha"], steps=plan["steps"])
    if attack == "fgsm":
        return fgsm(grad_model, x, y, eps=eps)
    import torchattacks

    if attack in ("apgd-ce", "apgd-dlr"):
        atk = torchattacks.APGD(grad_model, norm="Linf", eps=eps, steps=plan["steps"], n_restarts=1, seed=seed,
                                loss="ce" if attack == "apgd-ce" else "dlr")
    else:
        atk = torchattacks.Square(grad_model, norm="Linf", eps=eps, n_queries=plan["steps"], n_restarts=1, seed=seed,
                                  loss="margin")
    return atk(x, y).detach()


def attack_sweep(model, images: torch.Tensor, labels: torch.Tensor, *, attack: str, eps_list, batch_size: int = 256,
                 steps: int | None = None, alpha: float = 1 / 255, seed: int = 0, device="cpu",
                 attack_misclassified: bool = False, progress=None, audit: AuditConfig | None = None,
                 source=None, computation: str = "reference") -> SweepResult:
    """Attacks fixed batches of (uint8) images at each eps.

    The clean pass runs once and is shared by every eps. By default images the model already
    gets wrong are not attacked and count as not robust (attack_misclassified=False): the usual
    robust-accuracy definition, and it saves their cost. Evaluation batches are fixed (in order,
    ``batch_size`` each) because dopri5's step size is shared by a batch.

    audit: the strength of the audit attacks (AuditConfig defaults when None). source: for
    transfer-* attacks, the model the adversarial images are made on. ``model`` is always the
    one evaluated; for tol-* it is evaluated (clean pass included) at that tolerance.

    computation: "reference" (default) evaluates and attacks ``model`` and ``source`` on the reference
    computation (computation.as_reference, IEEE fp32 arithmetic) whatever they were trained with;
    "as-trained" on their own settings. The result says which (SweepResult.computation).
    """
    check_choice("computation", computation, COMPUTATIONS)
    if computation == "as-trained":
        return _attack_sweep(model, images, labels, attack, eps_list, batch_size, steps, alpha, seed, device,
                             attack_misclassified, progress, audit, source, computation)
    with reference_arithmetic():
        return _attack_sweep(as_reference(model), images, labels, attack, eps_list, batch_size, steps, alpha, seed,
                             device, attack_misclassified, progress, audit,
                             None if source is None else as_reference(source), computation)


def _attack_sweep(model, images, labels, attack, eps_list, batch_size, steps, alpha, seed, device,
                  attack_misclassified, progress, audit, source, computation) -> SweepResult:
    """attack_sweep's work, on the computation the models come with."""
    check_choice("attack", attack, ATTACKS)
    for e in eps_list:
        if not 0.0 <= e <= 1.0:
            raise ConfigError("eps", f"must be in [0, 1], got {e}")
    audit = (audit or AuditConfig()).validate()
    is_node = getattr(model, "cfg", None) is not None
    if attack in NODE_ONLY and not is_node:
        raise ConfigError("attack", f"{attack} needs a Neural ODE (it changes or replaces the solver)")
    if attack in TRANSFER and source is None:
        raise ConfigError("attack", f"{attack} needs a source model to make its images on")
    model = model.to(device).eval()
    if attack in TOLERANCES:
        model = with_solver(model, rtol=TOLERANCES[attack], atol=TOLERANCES[attack])
    grad_model = model
    if attack in TRANSFER:
        grad_model = source.to(device).eval()
    elif attack == "pgd-rk4":
        grad_model = with_solver(model, solver="rk4", step_size=model.cfg.t1 / audit.rk4_steps)
    elif attack in CROSS_TOLERANCE:
        grad_model = with_solver(model, rtol=CROSS_TOLERANCE[attack], atol=CROSS_TOLERANCE[attack])
    x_all = images.to(device)
    y_all = labels.to(device)
    n = len(y_all)
    batches = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    clean = torch.empty(n, dtype=torch.bool, device=device)
    pred = torch.empty(n, dtype=torch.int64, device=device)
    clean_nfe = torch.zeros(n, dtype=torch.int64)
    with torch.no_grad():
        for s, t in batches:
            f0 = _nfe(model)
            pred[s:t] = model(x_all[s:t].float() / 255).argmax(1)
            clean[s:t] = pred[s:t] == y_all[s:t]
            clean_nfe[s:t] = _nfe(model) - f0
    counts = torch.bincount(pred.cpu(), minlength=1)
    rows = {k: [] for k in ("eps", "steps", "index", "clean", "adv", "nfe")}
    seconds, plans = {}, {}
    for k, eps in enumerate(eps_list):
        plan = attack_plan(attack, eps, audit, steps, alpha)
        plans[float(eps)] = plan
        gen = torch.Generator().manual_seed(seed * 7919 + k)
        adv_ok = clean.clone()
        nfe = clean_nfe.clone()
        t0 = time.perf_counter()
        if eps > 0 and plan["steps"] > 0:
            for s, t in batches:
                sel = torch.arange(s, t, device=device)
                if not attack_misclassified:
                    sel = sel[clean[s:t]]
                attacked = sel.cpu()
                f0 = _nfe(model, grad_model)
                for _ in range(plan["restarts"]):   # an image is robust only if every start fails
                    if len(sel) == 0:
                        break
                    x = x_all[sel].float() / 255
                    y = y_all[sel]
                    adv = _adversarial(attack, grad_model, x, y, eps, plan, gen, seed * 7919 + k)
                    with torch.no_grad():
                        ok = model(adv).argmax(1) == y
                    adv_ok[sel] = ok
                    sel = sel[ok]
                # evaluations of f that each attacked image went through (of either model)
                nfe[attacked] += _nfe(model, grad_model) - f0
        seconds[float(eps)] = time.perf_counter() - t0
        rows["eps"].append(np.full(n, eps))
        rows["steps"].append(np.full(n, plan["steps"], dtype=np.int32))
        rows["index"].append(np.arange(n))
        rows["clean"].append(clean.cpu().numpy())
        rows["adv"].append(adv_ok.cpu().numpy())
        rows["nfe"].append(nfe.numpy())
        if progress is not None:
            progress(k + 1, len(eps_list), eps, float(adv_ok.float().mean()))
    cat = {k: np.concatenate(v) for k, v in rows.items()}
    return SweepResult(attack, cat["eps"], cat["steps"], cat["index"], np.tile(labels.cpu().numpy(), len(eps_list)),
                       cat["clean"], cat["adv"], cat["nfe"], seconds, plans, solver_info(model),
                       {"computation": computation, **computation_info(model, device)},
                       float(counts.max()) / max(1, n))


def sweep_table(res: SweepResult, *, seed: int):
    """SweepResult -> pyarrow Table with results.SAMPLE_SCHEMA: one row per (eps, image), with the solver and
    the computation the rows were made with."""
    import pyarrow as pa

    from .results import SAMPLE_COMPUTATION, SAMPLE_SCHEMA

    n = len(res.eps)
    how = {**{k: res.solver.get(k, "" if k in ("solver", "time_input") else None) for k in ("solver", "rtol", "atol",
                                                                                           "time_input")},
           **res.computation}
    return pa.table({
        "attack": [res.attack] * n, "eps": res.eps, "eps_255": res.eps * 255.0, "steps": res.steps,
        "index": res.index, "label": res.label, "clean_correct": res.clean_correct,
        "adv_correct": res.adv_correct, "nfe": res.nfe, "seed": np.full(n, seed, dtype=np.int64),
        **{k: [how.get(k)] * n for k in SAMPLE_COMPUTATION},
    }, schema=SAMPLE_SCHEMA)
