"""nodekd_ray/speed/dopri5.py against torchdiffeq's dopri5, and against exact solutions."""
import math

import pytest
import torch
from torchdiffeq import odeint

from nodekd_ray.speed.dopri5 import ODESolveError, dopri5
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


@pytest.mark.parametrize("kw, impl, gpu_control", [
    (dict(), "nodekd", "noise-aware"),
    (dict(precision="bf16"), "nodekd", "noise-aware"),
    (dict(precision="fp32"), "nodekd", "plain"),                 # IEEE fp32 has no rounding noise to take out
    (dict(adjoint=True), "torchdiffeq", "plain"),                # nodekd's dopri5 backpropagates only
    (dict(solver="rk4"), "torchdiffeq", "plain"),
    (dict(solver_impl="torchdiffeq"), "torchdiffeq", "plain"),
    (dict(step_control="plain"), "nodekd", "plain"),
    (dict(solver_impl="nodekd", step_control="noise-aware"), "nodekd", "noise-aware"),
])
def test_auto_defaults_pick_nodekd_and_noise_aware_on_a_gpu_where_they_apply(kw, impl, gpu_control):
    """The defaults (solver_impl and step_control "auto") resolve per configuration and device: nodekd's dopri5
    wherever it applies, noise-aware step control only on a GPU (a CPU's tf32 is IEEE fp32), explicit values as
    given. A configuration that could not take nodekd (the adjoint method, rk4) still validates."""
    cfg = NODEConfig(**kw).validate()
    assert cfg.solver_impl_used() == impl
    assert cfg.step_control_used(cuda=True) == gpu_control
    assert cfg.step_control_used(cuda=False) == ("noise-aware" if kw.get("step_control") == "noise-aware"
                                                 else "plain")


def test_the_default_student_solves_with_nodekds_dopri5_and_adjoint_with_torchdiffeqs(monkeypatch):
    import nodekd_ray.speed.dopri5 as speed_dopri5

    calls = []

    def counting(*args, **kw):
        calls.append(kw.get("reference"))
        return dopri5(*args, **kw)

    monkeypatch.setattr(speed_dopri5, "dopri5", counting)
    torch.manual_seed(5)
    x = torch.rand(2, 3, 32, 32)
    default = NeuralODE(NODEConfig(width=16))
    explicit = NeuralODE(NODEConfig(width=16, solver_impl="nodekd", step_control="plain"))
    explicit.load_state_dict(default.state_dict())
    assert torch.equal(default(x), explicit(x))
    assert calls == [None, None]        # on a CPU "auto" step control is plain: no reference evaluations
    adjoint = NeuralODE(NODEConfig(width=16, adjoint=True))
    adjoint.load_state_dict(default.state_dict())
    assert _rel(adjoint(x).detach(), default(x).detach()) < 1e-3 and len(calls) == 3


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
    aware = NeuralODE(NODEConfig(width=16, precision="bf16", solver_impl="nodekd", step_control="noise-aware"))
    assert with_solver(aware, solver="rk4").cfg.step_control == "plain"          # torchdiffeq's rk4: no noise control
    assert with_solver(aware, rtol=1e-5).cfg.step_control == "noise-aware"
    with torch.no_grad():
        a, b, c = m(x), tight(x), rk4(x)
    assert _rel(a, b) < 1e-2 and _rel(c, b) < 1e-2      # the same function, solved three ways


def test_sweep_flags_reach_the_students_config():
    """--speed, --node FIELD=VALUE and --recompute on a sweep script end up in every student's NODEConfig, --speed
    resolved for the device the student trains on; unknown fields and bad values are one-line errors."""
    from nodekd_ray.errors import ConfigError
    from nodekd_ray.orchestration.entry import settings_from_args, sweep_parser
    from nodekd_ray.sweep import StudentJob, student_config

    ap = sweep_parser("t", default_scale="digits")
    job = StudentJob(dataset="digits", t1=10.0)
    argv = ["--node", "solver_impl=nodekd", "--node", "recompute=true", "--node", "precision=bf16", "--node",
            "step_control=noise-aware"]
    node = student_config(job, settings_from_args(ap.parse_args(argv))).node.validate()
    assert (node.solver_impl, node.recompute, node.precision, node.step_control, node.t1) == \
        ("nodekd", True, "bf16", "noise-aware", 10.0)
    node = student_config(job, settings_from_args(ap.parse_args([]))).node
    assert (node.solver_impl, node.recompute, node.step_control, node.precision) == ("auto", False, "auto", "tf32")
    settings = settings_from_args(ap.parse_args(["--speed", "fastest"]))
    cpu = student_config(job, settings, device="cpu").node
    gpu = student_config(job, settings, device="cuda:0").node
    assert (cpu.precision, cpu.solver_impl, cpu.step_control, cpu.norm_impl, cpu.cuda_graphs) == \
        ("bf16", "nodekd", "noise-aware", "torch", False)
    assert (gpu.norm_impl, gpu.cuda_graphs) == ("triton", True)
    ref = student_config(job, settings_from_args(ap.parse_args(["--speed", "reference"])), device="cuda").node
    assert (ref.precision, ref.solver_impl, ref.step_control) == ("fp32", "torchdiffeq", "plain")
    over = student_config(job, settings_from_args(ap.parse_args(["--speed", "fastest", "--node", "precision=tf32"])),
                          device="cpu").node
    assert (over.precision, over.solver_impl) == ("tf32", "nodekd")      # --node on top of --speed
    for bad, field in ((["--node", "precison=bf16"], "node"), (["--node", "recompute=maybe"], "node.recompute"),
                       (["--node", "rtol"], "node")):
        with pytest.raises(ConfigError) as e:
            settings_from_args(ap.parse_args(bad))
        assert e.value.field == field
    for removed in (["--bf16-norms"], ["--precision", "bf16"], ["--solver-impl", "nodekd"]):
        with pytest.raises(SystemExit):
            ap.parse_args(removed)      # one switch (--speed); the fine settings through --node


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


# ----------------------------------------------------------------------------- step control that knows f's noise


def _rounded_linear_ode(seed=0, n=2048, d=64):
    """y' = A y with eigenvalues in [-1, 0.2] (smooth: dopri5 needs 2 steps over [0, 1] at rtol 1e-3), in
    float64 (the reference) and as a bf16 matmul would compute it (inputs, weights and output rounded to bf16:
    the rounding noise of a bf16 f). The exact solution is exp(A t1) y0."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=g))
    a = q @ torch.diag(torch.linspace(-1.0, 0.2, d, dtype=torch.float64)) @ q.T
    a_low = a.to(torch.bfloat16).double()

    def exact(t, y):
        return y @ a.T

    def low(t, y):
        return (y.to(torch.bfloat16).double() @ a_low.T).to(torch.bfloat16).double()

    y0 = torch.randn(n, d, dtype=torch.float64, generator=g)
    return exact, low, y0, y0 @ torch.linalg.matrix_exp(a).T


def _counted(f):
    calls = []

    def g(t, y):
        calls.append(float(t))
        return f(t, y)
    return g, calls


def test_noise_aware_steps_take_the_exact_fs_steps_on_a_rounded_f():
    """On a smooth problem a bf16-rounded f makes plain dopri5 take a third step that exact arithmetic does
    not need (its error estimates are all rounding noise: 4e-3 against 3e-6); with the exact f as reference
    the rounded f takes the exact f's two steps, and its answer keeps the rounding-level error."""
    exact, low, y0, y_exact = _rounded_linear_ode()
    runs = {}
    for name, f, ref in (("exact", exact, None), ("plain", low, None), ("noise-aware", low, exact)):
        g, calls = _counted(f)
        stats = {}
        y = dopri5(g, y0, 0.0, 1.0, rtol=1e-3, atol=1e-3, reference=ref, stats=stats)
        runs[name] = (len(calls), stats, _rel(y, y_exact))
    (n_exact, s_exact, e_exact), (n_plain, s_plain, e_plain), (n_aware, s_aware, e_aware) = \
        runs["exact"], runs["plain"], runs["noise-aware"]
    assert (n_exact, s_exact["accepted"], s_exact["rejected"]) == (14, 2, 0)
    assert s_exact["ratios"][0] < 1e-5 and s_plain["ratios"][0] > 1e-3      # the first estimate: truncation vs noise
    assert n_plain == 20 and (s_plain["accepted"], s_plain["rejected"]) == (3, 0)
    assert n_aware == 14 and (s_aware["accepted"], s_aware["rejected"]) == (2, 0)
    assert s_aware["first_step"] == pytest.approx(s_exact["first_step"], rel=1e-3)
    # accuracy: both rounded runs are rounding-bound (3x the exact f's truncation error, under rtol); the
    # noise-aware run's fewer, longer steps add up the rounding over fewer terms (sqrt(sum h^2) larger)
    assert e_exact < 5e-4 and e_plain < 1.2e-3 and e_aware < 1.5 * e_plain and e_aware < 1.5e-3


def test_the_noise_model_matches_the_noise_part_of_the_error_estimate():
    """r_n, the solver's estimate of the rounding noise in its first step's error ratio (from two reference
    evaluations at the first-step rule's points), against the noise part measured directly: the error estimate
    of the rounded stages minus that of the exact f at the same stage states."""
    from nodekd_ray.speed.dopri5 import _ALPHA, _BETA, _C_ERROR, _combine

    exact, low, y0, _ = _rounded_linear_ode(seed=1)
    stats = {}
    dopri5(low, y0, 0.0, 1.0, rtol=1e-3, atol=1e-3, reference=exact, stats=stats)
    h = stats["first_step"]
    ks, ks_exact = [low(0.0, y0)], [exact(0.0, y0)]
    for alpha, beta in zip(_ALPHA, _BETA):
        y = _combine(y0, [b * h for b in beta], ks)
        ks.append(low(alpha * h, y))
        ks_exact.append(exact(alpha * h, y))
    noise = _combine(None, [c * h for c in _C_ERROR], [a - b for a, b in zip(ks, ks_exact)])
    y1 = _combine(y0, [b * h for b in _BETA[-1]], ks)
    tol = torch.maximum(y0.abs(), y1.abs()) * 1e-3 + 1e-3
    measured = float((noise / tol).square().mean().sqrt())
    assert measured > 1e-3
    assert 0.7 * measured < stats["noise_ratios"][0] < 1.4 * measured, (stats["noise_ratios"][0], measured)


def test_noise_aware_steps_with_an_exact_f_are_the_plain_steps():
    """A reference that is f itself: no noise, the same first step, steps, answer and gradients as without one."""
    torch.manual_seed(6)
    f = NeuralODE(NODEConfig(width=16, t1=1.0, precision="fp32")).double().func
    h0 = torch.randn(2, 16, 8, 8, dtype=torch.float64, requires_grad=True)
    out = []
    for ref in (None, f):
        g, calls = _counted(f)
        stats = {}
        y = dopri5(g, h0, 0.0, 1.0, rtol=1e-3, atol=1e-3, reference=ref, stats=stats)
        out.append((y, calls, stats, torch.autograd.grad(y.square().sum(), [h0, *f.parameters()])))
    (y_a, c_a, s_a, g_a), (y_b, c_b, s_b, g_b) = out
    assert c_a == c_b and len(c_a) > 10 and s_b["noise_ratios"] == [0.0] * len(s_b["ratios"])
    assert s_a["ratios"] == s_b["ratios"] and torch.equal(y_a, y_b)
    assert all(torch.equal(a, b) for a, b in zip(g_a, g_b))


@pytest.mark.parametrize("kw", [dict(time_input="raw"), dict(time_input="scaled", t1=10.0), dict(time_input="none"),
                                dict(channels_last=True), dict(time_conv="concat")])
def test_reference_evaluation_is_the_fp32_function(kw):
    """ODEFunc.reference (the noise-aware step control's yardstick) is f as precision fp32 computes it, whatever
    the model's own precision: counted apart from nfe, without autograd."""
    torch.manual_seed(7)
    fp32 = NeuralODE(NODEConfig(width=32, precision="fp32", **kw)).func
    bf16 = NeuralODE(NODEConfig(width=32, precision="bf16", **kw)).func
    bf16.load_state_dict(fp32.state_dict())
    h = torch.randn(3, 32, 8, 8, requires_grad=True)
    if kw.get("channels_last"):
        h = h.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    t = torch.tensor(0.7)
    want = fp32(t, h)
    got = bf16.reference(t, h)
    assert not got.requires_grad and (bf16.nfe, bf16.nfe_reference) == (0, 1)
    assert _rel(got, want.detach()) < 1e-6
    assert _rel(bf16(t, h).detach().float(), want.detach()) > 1e-4      # the model's own f is bf16


def test_noise_aware_student_trains_and_evaluates_with_two_reference_evaluations_per_solve():
    torch.manual_seed(8)
    m = NeuralODE(NODEConfig(width=16, precision="bf16", solver_impl="nodekd", step_control="noise-aware"))
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    torch.nn.functional.cross_entropy(m(x), y).backward()
    assert m.func.nfe_reference == 2 and m.nfe_forward > 10 and m.nfe_backward > 10
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    with torch.no_grad():
        m(x)
    assert m.func.nfe_reference == 4


@pytest.mark.parametrize("kw, why", [(dict(step_control="noise-aware", precision="bf16", solver_impl="torchdiffeq"),
                                      "solver_impl 'torchdiffeq'"),
                                     (dict(step_control="noise-aware", adjoint=True), "solver_impl 'torchdiffeq'"),
                                     (dict(step_control="noise-aware", solver_impl="nodekd", precision="fp32"),
                                      "precision 'fp32'"),
                                     (dict(step_control="pid"), "allowed: auto, plain, noise-aware")])
def test_step_control_is_checked(kw, why):
    with pytest.raises(ConfigError, match=f"step_control: .*{why}"):
        NODEConfig(**kw).validate()


def test_bench_step_control_measures_a_trained_students_own_width_on_test_batches(tmp_path, capsys):
    """benchmarks/bench_step_control.py --checkpoint: the student's width and horizon are the checkpoint's (its
    header said the --width default, 512, for a width-64 student), and each row solves the same digits test batch."""
    import importlib.util
    import os

    from nodekd_ray.checkpoints import save_checkpoint

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("bench_step_control",
                                                  os.path.join(root, "benchmarks", "bench_step_control.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    torch.manual_seed(0)
    cfg = NODEConfig(width=16, stem_channels=8, t1=2.0)
    path = str(tmp_path / "s.pt")
    save_checkpoint(path, NeuralODE(cfg, 10), arch="node", num_classes=10, mean=(0.5,) * 3, std=(0.25,) * 3,
                    node=cfg.__dict__)
    bench.main(["--checkpoint", path, "--dataset", "digits", "--batch", "8", "--batches", "2",
                "--rows", "fp32", "bf16", "bf16+noise", "--no-time"])
    out = capsys.readouterr().out
    assert "student width 16, batch 8, t1 2," in out
    assert "digits test batch 1" in out and "digits test batch 2" not in out
    assert "mean over 2 states" in out and "bf16: plain / noise-aware forward NFE" in out


def test_bench_graphs_smoke_measures_f_eagerly_and_each_rows_rate_follows_its_time():
    """benchmarks/bench_graphs.py on a CPU: eager rows only (no CUDA graphs), each row's MFU its FLOPs over
    its time over the printed matmul rate."""
    import os
    import re
    import subprocess
    import sys

    root = os.path.join(os.path.dirname(__file__), "..")
    r = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "bench_graphs.py"), "--smoke"], cwd=root,
                       capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": root})
    assert r.returncode == 0, r.stderr
    peak = float(re.search(r"matmul rate \(MFU denominator\): ([\d.]+)", r.stdout).group(1))
    gflop = float(re.search(r"f forward \+ backward ([\d.]+) GFLOP", r.stdout).group(1))
    rows = re.findall(r"^  (tf32|bf16) +torch +(f|f-solve) +([\d.]+) +([\d.]+)% \(no CUDA graphs", r.stdout, re.M)
    assert len(rows) == 4, r.stdout
    for *_, ms, mfu in rows:
        # printed to 4 digits, the time to 3 decimals of a ms and the MFU to 0.1 of a per cent
        assert float(mfu) == pytest.approx(100 * gflop / float(ms) / peak, rel=0.02, abs=0.06)


def _bench_module(name: str):
    import importlib
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def test_profile_graphed_step_pairs_each_evaluations_backward_by_its_own_marks():
    """profile_graphed_step.f_times: forward intervals summed as recorded; a backward interval runs from its
    evaluation's start mark to its own end mark even when another evaluation's marks fall in between; an
    evaluation whose backward never ran (a rejected step) counts forward only; a start without its end is an error."""
    prof = _bench_module("profile_graphed_step")

    class Clock:   # marks are plain numbers of seconds
        def seconds(self, a, b):
            return b - a

    log = prof.Log(Clock())
    log += [(("forward", 0), 0.0, 1.0), (("forward", 1), 1.0, 1.5), (("forward", 2), 2.0, 4.0),
            (("backward_start", 1), 10.0), (("backward_start", 0), 10.5), (("backward_end", 1), 11.0),
            (("backward_end", 0), 13.0)]
    assert prof.f_times(log) == (3.5, 3, 3.5, 2)
    log.append((("backward_start", 2), 20.0))
    with pytest.raises(RuntimeError, match="never ended"):
        prof.f_times(log)


def test_profile_graphed_step_brackets_every_graphed_evaluation_with_autograd():
    """On a CPU with the tests' stand-in for make_graphed_callables (tests/test_cuda_graphs.py), the graphed path
    runs: every evaluation of f with autograd is bracketed forward (NFE less the first-step rule's probe, which
    has no autograd) and backward (all of the backward NFE), f's time is inside the step's, and the MFU figures
    are the FLOPs over those times."""
    import torch

    from nodekd_ray.speed.cuda_graphs import GraphedSolves
    from test_cuda_graphs import static_slots

    prof = _bench_module("profile_graphed_step")
    bench = _bench_module("bench_student")
    integrate = NeuralODE.integrate

    def graphed_integrate(self, h0):
        if self.cfg.cuda_graphs and self._graphs is None:
            self._graphs = GraphedSolves(self.func, make_graphed=lambda c, a: static_slots(c, a, self.func))
        return integrate(self, h0)

    class Args:
        width, stem, batch, t1, steps, warmup = 16, 8, 4, 1.0, 2, 1

    NeuralODE.integrate = graphed_integrate
    try:
        r = prof.profile("tf32+nodekd+noise+graphs", Args, torch.device("cpu"), peak=1.0)
    finally:
        NeuralODE.integrate = integrate
    assert r["graph_solves"] == 5                     # 1 warm-up + 2 plain + 2 marked steps, each one solve
    nfe_f, nfe_b = r["nfe_marked"]                    # Adam moves the weights: NFE can differ between steps
    assert r["bracketed_forward"] == nfe_f - 1 and r["bracketed_backward"] == nfe_b > 0
    assert 0 < r["f_s"] < r["step_s_marked"] and r["f_share"] == pytest.approx(r["f_s"] / r["step_s_marked"])
    gf = bench.f_gflop(16) * 4 * 1e9
    assert r["mfu_f_forward"] == pytest.approx(gf * r["bracketed_forward"] / r["f_forward_s"] / 1e12)
    assert r["mfu_f"] == pytest.approx(gf * (r["bracketed_forward"] + 2 * r["bracketed_backward"]) / r["f_s"] / 1e12)


def test_profile_kernels_sorts_kernel_names_into_kinds():
    kind = _bench_module("profile_kernels").kind
    assert kind("sm90_xmma_dgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc") == "conv/gemm"
    assert kind("void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16>") == "conv/gemm"
    assert kind("gn_bwd") == "other" and kind("triton_poi_fused_add_0") == "triton"
    assert kind("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>") == "elementwise"
    assert kind("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<c10::BFloat16>>") == "reduce"
    assert kind("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda>") == "copy"
