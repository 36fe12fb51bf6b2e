"""nodekd_ray/dopri5.py against torchdiffeq's dopri5, and against exact solutions."""
import math

import pytest
import torch
from torchdiffeq import odeint

from nodekd_ray.dopri5 import ODESolveError, dopri5
from nodekd_ray.errors import ConfigError
from nodekd_ray.models import NODEConfig, NeuralODE


def _recording(f, times):
    def g(t, h):
        times.append(float(t.detach()))
        return f(t, h)
    return g


def _both(f, h0, t1, rtol=1e-3, atol=1e-3, first_step=None, grad=True):
    """(y, times f saw, gradients of sum(y^2) wrt h0 and f's parameters) for torchdiffeq and for ours."""
    out = {}
    params = [p for p in getattr(f, "parameters", lambda: [])()]
    for impl in ("torchdiffeq", "nodekd"):
        times = []
        g = _recording(f, times)
        if impl == "torchdiffeq":
            options = {} if first_step is None else {"first_step": first_step}
            y = odeint(g, h0, torch.tensor([0.0, t1]), rtol=rtol, atol=atol, method="dopri5", options=options)[-1]
        else:
            y = dopri5(g, h0, 0.0, t1, rtol=rtol, atol=atol, first_step=first_step)
        grads = torch.autograd.grad(y.square().sum(), [h0] + params) if grad else None
        out[impl] = (y.detach(), times, grads)
    return out["torchdiffeq"], out["nodekd"]


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("t1", [1.0, 100.0])
def test_same_steps_as_torchdiffeq_on_the_student_in_float64(t1):
    torch.manual_seed(0)
    f = NeuralODE(NODEConfig(width=16, t1=t1, precision="fp32")).double().func
    h0 = torch.randn(2, 16, 8, 8, dtype=torch.float64, requires_grad=True)
    (y_a, t_a, g_a), (y_b, t_b, g_b) = _both(f, h0, t1)
    assert len(t_a) == len(t_b) > 10                       # same NFE: every step accepted or rejected alike
    assert max(abs(a - b) for a, b in zip(t_a, t_b)) < 1e-12 * t1
    assert t_a[:8] == t_b[:8]   # the first step's times exactly: the last two stages just below its end
    assert _rel(y_b, y_a) < 1e-12
    # gradients: torchdiffeq also differentiates through its first step's size; ours holds step sizes
    # constant. The difference is of the order of the solver's error, not of rounding
    assert max(_rel(b, a) for a, b in zip(g_a, g_b)) < 5e-3


@pytest.mark.parametrize("t1", [1.0, 100.0])
def test_same_gradients_as_torchdiffeq_given_the_same_first_step(t1):
    torch.manual_seed(1)
    f = NeuralODE(NODEConfig(width=16, t1=t1, precision="fp32")).double().func
    h0 = torch.randn(2, 16, 8, 8, dtype=torch.float64, requires_grad=True)
    (y_a, t_a, g_a), (y_b, t_b, g_b) = _both(f, h0, t1, first_step=0.01)
    assert len(t_a) == len(t_b)
    assert _rel(y_b, y_a) < 1e-12
    assert max(_rel(b, a) for a, b in zip(g_a, g_b)) < 1e-11


def test_rejected_steps_and_an_exact_solution():
    """y' = -30 (y - sin t) + cos t, y(0) = 1: y = sin t + exp(-30 t). A first step of 1 must be
    rejected (twice); the answer must be within the tolerance of the exact one, as torchdiffeq's is."""
    def f(t, y):
        return -30.0 * (y - torch.sin(t)) + torch.cos(t)

    y0 = torch.ones(3, dtype=torch.float64, requires_grad=True)
    (y_a, t_a, _), (y_b, t_b, g_b) = _both(f, y0, 5.0, rtol=1e-6, atol=1e-8, first_step=1.0)
    accepted_at_once = 1 + 6 * math.ceil(5.0 / 1.0)
    assert len(t_a) == len(t_b) > accepted_at_once
    assert t_b[1] == pytest.approx(0.2) and t_b[7] < 0.2 * 1.0     # the first try, then a shorter step
    assert _rel(y_b, y_a) < 1e-12
    exact = math.sin(5.0) + math.exp(-150.0)
    assert abs(float(y_b[0]) - exact) < 1e-5
    # d y(5) / d y(0) = exp(-150): the gradient of sum(y^2) is 2 y(5) exp(-150), essentially 0
    assert float(g_b[0].abs().max()) < 1e-8


def test_float32_student_takes_the_same_number_of_steps():
    torch.manual_seed(2)
    for t1 in (1.0, 100.0):
        f = NeuralODE(NODEConfig(width=16, t1=t1, precision="fp32")).func
        h0 = torch.randn(2, 16, 8, 8)
        with torch.no_grad():
            (y_a, t_a, _), (y_b, t_b, _) = _both(f, h0, t1, grad=False)
        assert len(t_a) == len(t_b)
        assert _rel(y_b, y_a) < 1e-5          # float32 sums taken in another order: rounding, not method


def test_neural_ode_with_solver_impl_nodekd_matches_torchdiffeq_and_counts_the_same_nfe():
    torch.manual_seed(3)
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    models = {}
    for impl in ("torchdiffeq", "nodekd"):
        torch.manual_seed(4)
        m = NeuralODE(NODEConfig(width=16, t1=100.0, precision="fp32", solver_impl=impl)).double()
        logits = m(x)
        logits.sum().backward()
        models[impl] = (logits.detach(), m.nfe_forward, m.nfe_backward, m)
    a, b = models["torchdiffeq"], models["nodekd"]
    assert _rel(b[0], a[0]) < 1e-12
    assert a[1] == b[1] and b[2] > 0
    for (name, p), q in zip(a[3].named_parameters(), b[3].parameters()):
        assert _rel(q.grad, p.grad) < 5e-3, name


def test_solver_failures_are_one_line_errors():
    m = NeuralODE(NODEConfig(width=16, t1=100.0, max_num_steps=2, solver_impl="nodekd"))
    with pytest.raises(ODESolveError, match=r"dopri5 failed over \[0, 100\]: max_num_steps exceeded \(2>=2\)"):
        m(torch.rand(2, 3, 32, 32))
    with pytest.raises(ODESolveError, match="non-finite state"):
        dopri5(lambda t, y: torch.where(t > 0.5, torch.full_like(y, float("nan")), -y), torch.ones(2), 0.0, 1.0,
               rtol=1e-3, atol=1e-3)
    with pytest.raises(ODESolveError, match="non-finite initial state"):
        dopri5(lambda t, y: -y, torch.tensor([1.0, float("inf")]), 0.0, 1.0, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("kw", [dict(solver="rk4"), dict(adjoint=True), dict(solver_impl="scipy")])
def test_solver_impl_is_checked(kw):
    with pytest.raises(ConfigError, match="solver_impl"):
        NODEConfig(**{"solver_impl": "nodekd", **kw}).validate()


def test_bench_solver_counts_fewer_operations_and_synchronisations_for_the_same_steps():
    """benchmarks/bench_solver.py's first measurement, which the README quotes: a student training step
    dispatches fewer ATen operations, copies and scalar reads with solver_impl "nodekd", at equal NFE."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_solver.py")
    spec = importlib.util.spec_from_file_location("bench_solver", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.count_ops(torch.device("cpu"))
    (ops_a, copies_a, syncs_a, nf_a, nb_a, _), (ops_b, copies_b, syncs_b, nf_b, nb_b, _) = \
        rows["torchdiffeq"], rows["nodekd"]
    assert (nf_a, nb_a) == (nf_b, nb_b) and nf_a > 10
    assert ops_b < 0.8 * ops_a and copies_b < copies_a / 3 and syncs_b < syncs_a / 5


def test_audit_solver_changes_work_on_a_student_trained_with_nodekd():
    """The audit re-solves students with other settings: tolerances (same dopri5, same implementation)
    and rk4 gradients (torchdiffeq's rk4: nodekd implements dopri5 only)."""
    from nodekd_ray.attacks import with_solver

    torch.manual_seed(5)
    m = NeuralODE(NODEConfig(width=16, t1=1.0, solver_impl="nodekd")).eval()
    x = torch.rand(2, 3, 32, 32)
    tight = with_solver(m, rtol=1e-6, atol=1e-6)
    assert tight.cfg.solver_impl == "nodekd" and tight.cfg.rtol == 1e-6
    rk4 = with_solver(m, solver="rk4", step_size=0.25)
    assert rk4.cfg.solver_impl == "torchdiffeq" and m.cfg.solver_impl == "nodekd"
    with torch.no_grad():
        a, b, c = m(x), tight(x), rk4(x)
    assert _rel(a, b) < 1e-2 and _rel(c, b) < 1e-2      # the same function, solved three ways


def test_sweep_flags_reach_the_students_config():
    """--solver-impl, --recompute and --bf16-norms on a sweep script end up in every student's NODEConfig."""
    from nodekd_ray.orchestration.entry import settings_from_args, sweep_parser
    from nodekd_ray.sweep import StudentJob, student_config

    ap = sweep_parser("t", default_scale="digits")
    job = StudentJob(dataset="digits", t1=10.0)
    argv = ["--solver-impl", "nodekd", "--recompute", "--precision", "bf16", "--bf16-norms"]
    node = student_config(job, settings_from_args(ap.parse_args(argv))).node
    assert (node.solver_impl, node.recompute, node.bf16_norms, node.t1) == ("nodekd", True, True, 10.0)
    node = student_config(job, settings_from_args(ap.parse_args([]))).node
    assert (node.solver_impl, node.recompute, node.bf16_norms) == ("torchdiffeq", False, False)


def test_bench_solver_smoke_runs():
    import os
    import subprocess
    import sys

    root = os.path.join(os.path.dirname(__file__), "..")
    r = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "bench_solver.py"), "--smoke"], cwd=root,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    import re

    nfe = re.findall(r"NFE per step (\d+)", r.stdout)
    assert r.stdout.count("nodekd") >= 4 and len(nfe) == 2 and nfe[0] == nfe[1]   # same steps, both solvers
