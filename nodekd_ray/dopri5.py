"""dopri5 for training by plain backpropagation: torchdiffeq's method, step for step, with less work
per step. Used by the student when ``NODEConfig.solver_impl == "nodekd"`` (the default stays
torchdiffeq's own solver; see the field's comment).

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


class ODESolveError(RuntimeError):
    """The ODE solve failed: step-size underflow, the step limit, or a non-finite state."""


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
           max_num_steps: int = 2 ** 31 - 1, first_step: float | None = None) -> torch.Tensor:
    """y(t1) for dy/dt = func(t, y), y(t0) = y0, t1 > t0. ``func`` gets t as a 0-d tensor in y0's dtype.

    Step sizes are constants to autograd. torchdiffeq differentiates through its first step's size
    (``_select_initial_step`` runs with autograd on, and every later time is offset by that step), a
    dependence of the order of the solver's local error; given the same ``first_step`` the two give
    the same gradients to rounding (tests/test_dopri5.py)."""
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
    dt = _first_step(f_at, t0, y0, f0, rtol, atol, real) if first_step is None else float(first_step)
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
            ratio = float(_rms(err.div_(tol)))
        n_steps += 1
        if not np.isfinite(ratio):
            raise ODESolveError(f"non-finite state at t = {t:g} (error estimate {ratio})")
        accept = ratio <= 1
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


def _first_step(f_at, t0: float, y0, f0, rtol: float, atol: float, real) -> float:
    """torchdiffeq's _select_initial_step (Hairer, Norsett and Wanner, section II.4) for order 5:
    one more evaluation of f. Its arithmetic is in the state's dtype, as torchdiffeq's is."""
    with torch.no_grad():
        scale = torch.abs(y0).mul(rtol).add_(atol)
        d0, d1 = float(_rms(y0 / scale)), float(_rms(f0 / scale))
    d0, d1 = real.type(d0), real.type(d1)                         # the norms as torchdiffeq has them
    if d0 < 1e-5 or d1 < 1e-5:
        h0 = real.type(1e-6)
    else:
        h0 = abs(real.type(0.01) * d0 / d1)
    with torch.no_grad():
        f1 = f_at(real.type(t0 + float(h0)), y0 + float(h0) * f0)
        d2 = abs(real.type(float(_rms((f1 - f0) / scale))) / h0)
    if d1 <= 1e-15 and d2 <= 1e-15:
        h1 = max(real.type(1e-6), h0 * real.type(1e-3))
    else:
        h1 = abs(real.type((real.type(0.01) / max(d1, d2)) ** real.type(1.0 / (_ORDER))))
    return float(min(real.type(100) * h0, h1))


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
