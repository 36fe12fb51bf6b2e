"""dopri5 for training by plain backpropagation: torchdiffeq's method, step for step, with less work
per step. Used by the student when ``NODEConfig.solver_impl_used()`` is "nodekd" (the default, "auto",
wherever dopri5 runs with plain backpropagation; see the field's comment).

What is the same as torchdiffeq 0.2.5's ``odeint(func, y0, [t0, t1], method="dopri5")`` (read in
``torchdiffeq/_impl/rk_common.py``, ``misc.py``, ``interp.py``, ``dopri5.py``):
  * the Dormand-Prince tableau, first-same-as-last;
  * the first step chosen by Hairer, Norsett and Wanner's rule (``_select_initial_step``, one extra
    evaluation of f) and the RMS error norm;
  * the step control: error ratio ``rms(err / (atol + rtol * max(|y0|, |y1|)))``, accept when it is
    at most 1, next step ``dt * min(10, max(0.9 / ratio ** (1/5), 0.2 or 1 if accepted))``;
  * steps overshoot t1 and the answer is the 4th-order interpolant at t1 (no last step clipped to t1);
  * f sees the times torchdiffeq gives it: stage times in the state's dtype, the last two stages at
    the float just below the step's end (``Perturb.PREV``).

What differs, none of it changing the method:
  * stages are separate tensors, each new stage state one chain of ``y0 + c * k`` adds. torchdiffeq
    keeps them in one (..., 7) tensor, strided 7 apart, and each stage's backward zero-fills and
    copies a gradient of that size: the many copy kernels of a profiled H100 training step;
  * the error estimate and its norm are computed outside autograd (they only steer the step size);
  * the interpolant is fitted only for the step that reaches t1 (torchdiffeq fits one for every
    accepted step and keeps the last), and it is folded with the step's stages into one linear
    combination ``y0 + sum_j g_j k_j``: the weights are host arithmetic, the device does 6 adds;
  * time arithmetic runs on the host: one synchronisation per step (the error ratio) instead of
    torchdiffeq's several device-scalar comparisons.
Sums are taken in a different order, so results agree with torchdiffeq to rounding, not bit for bit;
tests/test_dopri5.py compares the two step for step in float64 (same NFE, same answer to 1e-12).

Step control that knows f's rounding noise (``reference``; NODEConfig.step_control "noise-aware"). With f's
convolutions in bf16 or TF32, each stage k_i carries rounding noise of about the precision's unit roundoff
relative to f (bf16: 2^-8, above rtol = 1e-3). The error estimate h * sum_i c_i k_i is a fifth-order
difference of the stages: their smooth part cancels to O(h^5), their noise does not. Measured on a width-512
student after 3 training steps (benchmarks/bench_step_control.py, on a CPU), a first step's error ratio was
2.0e-6 in fp32 and 2.8e-3 in bf16: the bf16 estimate was all noise. dopri5 then grows the
step by 0.9 * ratio^(-1/5) = 2.9x instead of 10x, and takes 3 steps where fp32 takes 2 (the H100's 20 against
14 forward NFE per training step). The extra steps buy no accuracy: the solution's error is the rounding of
its stages, which smaller steps do not remove. Given ``reference``, f in higher precision (ODEFunc.reference:
fp32, or TF32 for a bf16 f on a GPU; two evaluations per solve, without autograd), the solver
  * measures the noise: n = (f(y0) - ref(y0)) - (f(y_p) - ref(y_p)) at the two points the first-step rule
    evaluates anyway (y_p = y0 + h0 f(y0)). The difference cancels the smooth part of the rounding (the
    weights' own rounding, the same at every evaluation, which the error estimate cancels too) and keeps
    the part that differs from one evaluation to the next; n / sqrt(2) is one sample of it;
  * chooses the first step from ref's values (f's noise inflated the rule's estimate of f's derivative);
  * takes the noise's share out of each step's error ratio, in quadrature: the noise part of the estimate
    is r_n = h * ||c||_2 * rms(n / sqrt(2) / tol), scaled by how f's size has changed since y0 (rounding is
    relative), and the step is accepted and resized by sqrt(max(ratio^2 - r_n^2, 0)). r_n is capped at 1/2,
    so an accepted step's truncation error is within sqrt(1 + 1/4) = 1.12x of the tolerance even if the
    noise is overestimated; the model itself (independent noise per stage) is checked against the noise part
    measured with fp64 stages in tests/test_dopri5.py.
It helps where the noise swamps the truncation error (every width-512 state measured); where the two are
close, taking the noise out would need its size to a few percent, and the estimate is good to about 20%
(README, "Step control that knows f's rounding noise").
"""
from __future__ import annotations

import numpy as np
import torch

_ALPHA = (1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_BETA = (
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_C_ERROR = (35 / 384 - 1951 / 21600, 0, 500 / 1113 - 22642 / 50085, 125 / 192 - 451 / 720,
            -2187 / 6784 - -12231 / 42400, 11 / 84 - 649 / 6300, -1. / 60.)
_C_MID = (6025192743 / 30085553152 / 2, 0, 51252292925 / 65400821598 / 2, -2691868925 / 45128329728 / 2,
          187940372067 / 1594534317056 / 2, -1776094331 / 19743644256 / 2, 11237099 / 235043384 / 2)
_ORDER = 5
_SAFETY, _IFACTOR, _DFACTOR = 0.9, 10.0, 0.2
_C_ERROR_NORM = float(np.linalg.norm(_C_ERROR))   # 0.0531: the error estimate's gain on independent noise per stage
NOISE_CAP = 0.5                                   # the most of a step's error ratio credited to rounding noise


from ..errors import ODESolveError  # noqa: E402,F401 -- raised here; core code catches it without importing this


def _combine(y0: torch.Tensor | None, weights, ks) -> torch.Tensor:
    """y0 + sum_j weights[j] * ks[j] (y0 None: the sum alone), one kernel per nonzero weight;
    autograd gives each k_j weights[j] times the incoming gradient."""
    out = y0
    for w, k in zip(weights, ks):
        if w != 0.0:
            out = torch.mul(k, float(w)) if out is None else torch.add(out, k, alpha=float(w))
    return out


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.abs().pow(2).mean().sqrt()


def dopri5(func, y0: torch.Tensor, t0: float, t1: float, *, rtol: float, atol: float,
           max_num_steps: int = 2 ** 31 - 1, first_step: float | None = None, reference=None,
           stats: dict | None = None) -> torch.Tensor:
    """y(t1) for dy/dt = func(t, y), y(t0) = y0, t1 > t0. ``func`` gets t as a 0-d tensor in y0's dtype.

    Step sizes are constants to autograd. torchdiffeq differentiates through its first step's size
    (``_select_initial_step`` runs with autograd on, and every later time is offset by that step), a
    dependence of the order of the solver's local error; given the same ``first_step`` the two give
    the same gradients to rounding (tests/test_dopri5.py).

    reference: None (torchdiffeq's step control), or the same f in higher precision, called as func is
    but without autograd: step control that discounts func's rounding noise (the module's docstring).
    stats: a dict that receives "first_step", "accepted", "rejected" and per step "ratios" (the error
    ratio as measured) and "noise_ratios" (r_n, 0 without reference)."""
    if not t1 > t0:
        raise ValueError(f"dopri5 integrates forwards: need t1 > t0, got [{t0}, {t1}]")
    device, dtype = y0.device, y0.dtype
    real = np.dtype(str(y0.abs().dtype).removeprefix("torch."))   # f's times are in the state's dtype
    t0, t1 = float(t0), float(t1)                                  # step control in float64, as torchdiffeq's

    def f_at(t, y_):
        return func(torch.full((), float(t), dtype=dtype, device=device), y_)

    with torch.no_grad():
        if not torch.isfinite(y0).all():
            raise ODESolveError("non-finite initial state")
    f0 = f_at(real.type(t0), y0)
    noise = None
    if reference is not None:
        def ref_at(t, y_):
            with torch.no_grad():
                return reference(torch.full((), float(t), dtype=dtype, device=device), y_)
        dt, noise = _first_step(f_at, t0, y0, f0, rtol, atol, real, ref_at)
        dt = dt if first_step is None else float(first_step)
        with torch.no_grad():
            noise = noise.div_(2 ** 0.5)                 # one sample of the noise of one evaluation
            f_size0 = _rms(f0).clamp_min(torch.finfo(dtype).tiny)
    else:
        dt = _first_step(f_at, t0, y0, f0, rtol, atol, real) if first_step is None else float(first_step)
    if stats is not None:
        stats.update(first_step=dt, accepted=0, rejected=0, ratios=[], noise_ratios=[])
    t = t0
    n_steps = 0
    while True:
        if n_steps >= max_num_steps:
            raise ODESolveError(f"max_num_steps exceeded ({n_steps}>={max_num_steps})")
        if not np.isfinite(dt):
            dt = 0.0
        t_end = t + dt
        if not t_end > t:
            raise ODESolveError(f"underflow in dt {dt}")
        # stage times as torchdiffeq computes them: t, dt and t_end cast to the state's dtype
        t_, dt_, te_ = real.type(t), real.type(dt), real.type(t_end)
        ks = [f0]
        for alpha, beta in zip(_ALPHA, _BETA):
            ti = np.nextafter(te_, te_ - 1) if alpha == 1.0 else t_ + real.type(alpha) * dt_
            yi = _combine(y0, [b * float(dt_) for b in beta], ks)
            ks.append(f_at(ti, yi))
        y1 = yi                                           # first same as last: k_7 = f(t_end, y1)
        with torch.no_grad():
            err = _combine(None, [c * float(dt_) for c in _C_ERROR], ks)
            tol = torch.maximum(y0.abs(), y1.abs()).mul_(rtol).add_(atol)
            ratio = _rms(err.div_(tol))
            if noise is None:
                ratio, noise_ratio = float(ratio), 0.0
            else:   # one synchronisation for both: the noise's rms over this step's tolerance, scaled by f's size
                ratio, noise_ratio = torch.stack([ratio, _rms(noise / tol) * (_rms(ks[0]) / f_size0)]).tolist()
                noise_ratio = min(float(dt_) * _C_ERROR_NORM * noise_ratio, NOISE_CAP)
        n_steps += 1
        if not np.isfinite(ratio):
            raise ODESolveError(f"non-finite state at t = {t:g} (error estimate {ratio})")
        if not np.isfinite(noise_ratio):
            raise ODESolveError(f"non-finite reference evaluation of f (noise estimate {noise_ratio})")
        if stats is not None:
            stats["ratios"].append(ratio)
            stats["noise_ratios"].append(noise_ratio)
        if noise_ratio:
            ratio = max(ratio * ratio - noise_ratio * noise_ratio, 0.0) ** 0.5
        accept = ratio <= 1
        if stats is not None:
            stats["accepted" if accept else "rejected"] += 1
        # next step size (torchdiffeq's _optimal_step_size, float64)
        if ratio == 0:
            dt_next = dt * _IFACTOR
        else:
            dfactor = 1.0 if ratio < 1 else _DFACTOR
            dt_next = dt * min(_IFACTOR, max(_SAFETY / ratio ** (1.0 / _ORDER), dfactor))
        if accept and t_end >= t1:
            return _interpolate(y0, ks, float(dt_), t, t_end, t1, real)
        if accept:
            t, y0, f0 = t_end, y1, ks[-1]
        dt = dt_next


def _first_step(f_at, t0: float, y0, f0, rtol: float, atol: float, real, ref_at=None):
    """torchdiffeq's _select_initial_step (Hairer, Norsett and Wanner, section II.4) for order 5:
    one more evaluation of f. Its arithmetic is in the state's dtype, as torchdiffeq's is.

    With ref_at (f in higher precision): the rule's derivative estimate d2 comes from ref_at's values at
    the same two points, and the return value is (step, the noise difference (f - ref) at y0 minus
    (f - ref) at the probe point)."""
    with torch.no_grad():
        scale = torch.abs(y0).mul(rtol).add_(atol)
        d0, d1 = float(_rms(y0 / scale)), float(_rms(f0 / scale))
    d0, d1 = real.type(d0), real.type(d1)                         # the norms as torchdiffeq has them
    if d0 < 1e-5 or d1 < 1e-5:
        h0 = real.type(1e-6)
    else:
        h0 = abs(real.type(0.01) * d0 / d1)
    with torch.no_grad():
        t_probe, y_probe = real.type(t0 + float(h0)), y0 + float(h0) * f0
        f1 = f_at(t_probe, y_probe)
        noise = None
        if ref_at is not None:
            r0, r1 = ref_at(real.type(t0), y0), ref_at(t_probe, y_probe)
            noise = (f0 - r0).sub_(f1 - r1)
            f0, f1 = r0, r1
        d2 = abs(real.type(float(_rms((f1 - f0) / scale))) / h0)
    if d1 <= 1e-15 and d2 <= 1e-15:
        h1 = max(real.type(1e-6), h0 * real.type(1e-3))
    else:
        h1 = abs(real.type((real.type(0.01) / max(d1, d2)) ** real.type(1.0 / (_ORDER))))
    step = float(min(real.type(100) * h0, h1))
    return step if ref_at is None else (step, noise)


def _interpolate(y0, ks, dt: float, t0: float, t_end: float, t: float, real) -> torch.Tensor:
    """torchdiffeq's 4th-order interpolant of the step [t0, t_end] at t, as y0 + sum_j g_j k_j.

    The interpolant is p(x) = e + d x + c x^2 + b x^3 + a x^4 (x = (t - t0) / (t_end - t0)) with
    coefficients built from y0, y1, the step's midpoint estimate y_mid, f0 = k_1 and f1 = k_7
    (torchdiffeq/_impl/interp.py). Each is a combination of y0 and the stages, so the weights are
    computed here, on the host, and the device adds 6 terms."""
    n = len(ks)
    y0v = np.zeros(n + 1); y0v[0] = 1.0                      # basis: [y0, k_1, ..., k_7]

    def k(j):
        v = np.zeros(n + 1); v[1 + j] = 1.0
        return v

    y1v = y0v + dt * np.concatenate([[0.0], _BETA[-1], [0.0]])
    ymv = y0v + dt * np.concatenate([[0.0], _C_MID])
    f0v, f1v = k(0), k(n - 1)
    a = 2 * dt * (f1v - f0v) - 8 * (y1v + y0v) + 16 * ymv
    b = dt * (5 * f0v - 3 * f1v) + 18 * y0v + 14 * y1v - 32 * ymv
    c = dt * (f1v - 4 * f0v) - 11 * y0v - 5 * y1v + 16 * ymv
    d = dt * f0v
    x = float(real.type((t - t0) / (t_end - t0)))
    g = y0v + x * d + x ** 2 * c + x ** 3 * b + x ** 4 * a
    # g[0], the weight of y0, is exactly 1: its weights in c, b and a are -11 - 5 + 16 = 18 + 14 - 32 = -16 + 16 = 0
    return _combine(y0, g[1:].tolist(), ks)
