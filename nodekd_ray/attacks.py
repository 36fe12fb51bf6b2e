"""White-box L-inf attacks on models that take pixels in [0, 1] (paper, section 4.3.1).

* PGD (Madry et al.): uniform random start in the eps-ball, step alpha = 1/255, projection.
* MI-FGSM (Dong et al.): momentum mu = 1, step 1/255, gradient divided by its per-image mean
  absolute value before it enters the momentum.
* FGSM: one step of size eps.
Steps s = floor(min(255 eps + 4, 1.25 * 255 eps)) unless given. The update rules are those of
torchattacks (tests check equal adversarial images); the loss is cross-entropy summed over the
batch, so an image's gradient does not depend on which batch it is in (the sign, and MI-FGSM's
normalized gradient, are the same as with torchattacks' batch mean).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ConfigError, check_choice
from .models import nfe_totals

ATTACKS = ("pgd", "mifgsm", "fgsm")


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

    def robust_accuracy(self) -> dict[float, float]:
        return {float(e): float(self.adv_correct[self.eps == e].mean()) for e in np.unique(self.eps)}


def attack_sweep(model, images: torch.Tensor, labels: torch.Tensor, *, attack: str, eps_list, batch_size: int = 256,
                 steps: int | None = None, alpha: float = 1 / 255, seed: int = 0, device="cpu",
                 attack_misclassified: bool = False, progress=None) -> SweepResult:
    """Attacks fixed batches of (uint8) images at each eps.

    The clean pass runs once and is shared by every eps. By default images the model already
    gets wrong are not attacked and count as not robust (attack_misclassified=False): the usual
    robust-accuracy definition, and it saves their cost. Evaluation batches are fixed (in order,
    ``batch_size`` each) because dopri5's step size is shared by a batch.
    """
    check_choice("attack", attack, ATTACKS)
    for e in eps_list:
        if not 0.0 <= e <= 1.0:
            raise ConfigError("eps", f"must be in [0, 1], got {e}")
    model = model.to(device).eval()
    x_all = images.to(device)
    y_all = labels.to(device)
    n = len(y_all)
    batches = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    clean = torch.empty(n, dtype=torch.bool, device=device)
    clean_nfe = torch.zeros(n, dtype=torch.int64)
    with torch.no_grad():
        for s, t in batches:
            f0 = sum(nfe_totals(model))
            clean[s:t] = model(x_all[s:t].float() / 255).argmax(1) == y_all[s:t]
            clean_nfe[s:t] = sum(nfe_totals(model)) - f0
    rows = {k: [] for k in ("eps", "steps", "index", "clean", "adv", "nfe")}
    seconds = {}
    for k, eps in enumerate(eps_list):
        n_steps = (1 if attack == "fgsm" else steps_for_eps(eps)) if steps is None else steps
        gen = torch.Generator().manual_seed(seed * 7919 + k)
        adv_ok = clean.clone()
        nfe = clean_nfe.clone()
        t0 = time.perf_counter()
        if eps > 0 and n_steps > 0:
            for s, t in batches:
                sel = torch.arange(s, t, device=device)
                if not attack_misclassified:
                    sel = sel[clean[s:t]]
                if len(sel) == 0:
                    continue
                x = x_all[sel].float() / 255
                y = y_all[sel]
                f0 = sum(nfe_totals(model))
                if attack == "pgd":
                    adv = pgd(model, x, y, eps=eps, alpha=alpha, steps=n_steps, generator=gen)
                elif attack == "mifgsm":
                    adv = mifgsm(model, x, y, eps=eps, alpha=alpha, steps=n_steps)
                else:
                    adv = fgsm(model, x, y, eps=eps)
                with torch.no_grad():
                    adv_ok[sel] = model(adv).argmax(1) == y
                nfe[sel.cpu()] += sum(nfe_totals(model)) - f0
        seconds[float(eps)] = time.perf_counter() - t0
        rows["eps"].append(np.full(n, eps))
        rows["steps"].append(np.full(n, n_steps if eps > 0 else 0, dtype=np.int32))
        rows["index"].append(np.arange(n))
        rows["clean"].append(clean.cpu().numpy())
        rows["adv"].append(adv_ok.cpu().numpy())
        rows["nfe"].append(nfe.numpy())
        if progress is not None:
            progress(k + 1, len(eps_list), eps, float(adv_ok.float().mean()))
    cat = {k: np.concatenate(v) for k, v in rows.items()}
    return SweepResult(attack, cat["eps"], cat["steps"], cat["index"], np.tile(labels.cpu().numpy(), len(eps_list)),
                       cat["clean"], cat["adv"], cat["nfe"], seconds)


def sweep_table(res: SweepResult, *, seed: int):
    """SweepResult -> pyarrow Table with results.SAMPLE_SCHEMA."""
    import pyarrow as pa

    from .results import SAMPLE_SCHEMA

    n = len(res.eps)
    return pa.table({
        "attack": [res.attack] * n, "eps": res.eps, "eps_255": res.eps * 255.0, "steps": res.steps,
        "index": res.index, "label": res.label, "clean_correct": res.clean_correct,
        "adv_correct": res.adv_correct, "nfe": res.nfe, "seed": np.full(n, seed, dtype=np.int64),
    }, schema=SAMPLE_SCHEMA)
