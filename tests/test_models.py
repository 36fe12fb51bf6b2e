import pytest
import torch

from nodekd_ray.errors import ConfigError
from nodekd_ray.checkpoints import build_model, count_parameters, load_checkpoint, save_checkpoint
from nodekd_ray.models import NeuralODE, NODEConfig, ODESolveError

from conftest import TINY_NODE


@pytest.mark.parametrize("arch,millions", [("resnet20", 0.27), ("resnet32", 0.46), ("resnet44", 0.66),
                                           ("resnet56", 0.85), ("resnet110", 1.7)])
def test_resnet_parameter_counts(arch, millions):
    n = count_parameters(build_model(arch)) / 1e6
    assert abs(n - millions) / millions <= 0.02


def test_node_paper_size_dynamics_are_4_layers_of_512():
    m = build_model("node")
    convs = [c for c in m.func.convs]
    assert len(convs) == 4 and all(c.kernel_size == (3, 3) and c.out_channels == 512 for c in convs)
    # 4 x (513 * 512 * 9 + 512): 512 channels plus the time channel
    assert sum(p.numel() for p in m.func.convs.parameters()) == 4 * (513 * 512 * 9 + 512)


def test_normalization_is_inside_the_model():
    m = build_model("resnet20", mean=[0.2, 0.3, 0.4], std=[0.5, 0.5, 0.5]).eval()
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(m.normalize(x), (x - torch.tensor([0.2, 0.3, 0.4]).view(1, 3, 1, 1)) / 0.5)


def test_node_counts_forward_and_backward_evaluations():
    torch.manual_seed(0)
    m = build_model("node", node=TINY_NODE)
    x = torch.rand(4, 3, 32, 32)
    out = m(x)
    assert out.shape == (4, 10)
    nf = m.nfe_forward
    assert nf >= 8 and m.nfe_backward == 0   # dopri5: at least one step (6) plus the first-step probe
    out.sum().backward()
    nb = m.nfe_backward  # one vector-Jacobian product per evaluation in the graph; rejected
    assert 6 <= nb <= nf  # dopri5 steps are evaluated but never backpropagated
    with torch.no_grad():
        m(x)
    assert m.nfe_forward == 2 * nf and m.nfe_backward == nb


def test_adjoint_gradients_converge_to_direct_backprop():
    """The adjoint solves a different (continuous) problem: its gradient approaches the direct
    one as the tolerance tightens (measured: 14% at 1e-4, 2.3% at 1e-6 relative error)."""
    def rel_err(tol):
        torch.manual_seed(0)
        cfg = dict(TINY_NODE, rtol=tol, atol=tol)
        direct = build_model("node", node=cfg)
        adj = build_model("node", node=dict(cfg, adjoint=True))
        adj.load_state_dict(direct.state_dict())
        x = torch.rand(2, 3, 32, 32)
        direct(x).square().sum().backward()
        adj(x).square().sum().backward()
        g1, g2 = direct.func.convs[0].weight.grad, adj.func.convs[0].weight.grad
        assert adj.nfe_backward > 0 and adj.nfe_forward > adj.nfe_backward  # re-solves backwards
        return float((g1 - g2).norm() / g1.norm())

    loose, tight = rel_err(1e-4), rel_err(1e-6)
    assert tight < 0.05 and tight < loose / 3


def test_solver_failures_raise_ode_solve_error():
    m = build_model("node", node=dict(TINY_NODE, max_num_steps=1, rtol=1e-9, atol=1e-9))
    with pytest.raises(ODESolveError, match="max_num_steps"):
        m(torch.rand(2, 3, 32, 32))
    m = build_model("node", node=TINY_NODE)
    with pytest.raises(ODESolveError):
        m(torch.full((2, 3, 32, 32), float("nan")))


@pytest.mark.parametrize("field,value", [("solver", "rk45"), ("t1", 0.0), ("t1", -1.0), ("time_input", "x")])
def test_bad_node_config(field, value):
    with pytest.raises(ConfigError) as e:
        NODEConfig(**{field: value}).validate()
    assert e.value.field == field


def test_checkpoint_round_trip_and_wrong_architecture(tmp_path):
    torch.manual_seed(0)
    m = build_model("node", node=TINY_NODE, mean=[0.1, 0.2, 0.3], std=[0.3, 0.3, 0.3]).eval()
    path = str(tmp_path / "s.pt")
    save_checkpoint(path, m, arch="node", num_classes=10, mean=[0.1, 0.2, 0.3], std=[0.3] * 3, node=TINY_NODE,
                    meta={"test_accuracy": 0.5})
    raw = torch.load(path, weights_only=True)
    assert raw["arch"] == "node" and raw["meta"]["test_accuracy"] == 0.5
    loaded, _ = load_checkpoint(path, expect_arch="node")
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(m(x), loaded(x))
    with pytest.raises(ConfigError, match="holds a 'node' model; expected resnet20"):
        load_checkpoint(path, expect_arch="resnet20")
    raw["arch"] = "resnet20"
    torch.save(raw, tmp_path / "lie.pt")
    with pytest.raises(ConfigError, match="do not fit"):
        load_checkpoint(str(tmp_path / "lie.pt"))
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="cannot read"):
        load_checkpoint(str(tmp_path / "bad.pt"))


def _pair(time_input, t1, solver, **kw):
    """NODE(t1) and NODE(1) with the same weights, NODE(1)'s final GroupNorm affine times t1."""
    torch.manual_seed(0)
    cfg = dict(TINY_NODE, time_input=time_input, solver=solver, **kw)
    long = build_model("node", node=dict(cfg, t1=t1, step_size=t1 / 8 if solver == "rk4" else 0.0)).double()
    short = build_model("node", node=dict(cfg, t1=1.0, step_size=1 / 8 if solver == "rk4" else 0.0)).double()
    state = {k: v.clone() for k, v in long.state_dict().items()}
    state["func.norm_out.weight"] *= t1
    state["func.norm_out.bias"] *= t1
    short.load_state_dict(state)
    with torch.no_grad():
        for p in long.func.norm_out.parameters():   # a non-trivial affine, so the test can fail
            p.add_(0.1 * torch.randn_like(p))
        short.func.norm_out.weight.copy_(long.func.norm_out.weight * t1)
        short.func.norm_out.bias.copy_(long.func.norm_out.bias * t1)
    return long.eval(), short.eval()


@pytest.mark.parametrize("solver,t1,tol", [("rk4", 100.0, 1e-9), ("dopri5", 3.0, 1e-4)])
def test_scaled_time_makes_the_horizon_a_reparametrisation(solver, t1, tol):
    """With a t/t1 time channel, NODE(t1) == NODE(1) with the final GroupNorm's affine times t1
    (substitute s = t/t1: dh/ds = t1 f(s t1, h), and f ends in that GroupNorm). With raw t it is not."""
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    kw = dict(rtol=1e-6, atol=1e-6) if solver == "dopri5" else {}
    long, short = _pair("scaled", t1, solver, **kw)
    with torch.no_grad():
        a, b = long(x), short(x)
    assert a.abs().max() > 0.1
    assert torch.allclose(a, b, atol=tol, rtol=0), (a - b).abs().max()
    long, short = _pair("raw", t1, solver, **kw)
    with torch.no_grad():
        assert (long(x) - short(x)).abs().max() > 100 * tol


def test_default_time_input_is_raw_t():
    assert NODEConfig().time_input == "raw"


@pytest.mark.parametrize("time_input", ["raw", "scaled"])
def test_aligned_time_conv_is_the_concatenation(time_input):
    """conv(h) + t * (kernel's response to a constant channel, zero padding included) ==
    conv(cat([h, t])): outputs and every gradient, at t = 0.3 and t = 57 (the border pixels too)."""
    from nodekd_ray.models import ODEFunc

    torch.manual_seed(0)
    a = ODEFunc(16, time_input=time_input, t1=100.0, time_conv="aligned").double()
    b = ODEFunc(16, time_input=time_input, t1=100.0, time_conv="concat").double()
    b.load_state_dict(a.state_dict())
    for t in (0.3, 57.0):
        h = torch.randn(3, 16, 8, 8, dtype=torch.float64, requires_grad=True)
        ya, yb = a(torch.tensor(t, dtype=torch.float64), h), b(torch.tensor(t, dtype=torch.float64), h)
        assert torch.allclose(ya, yb, atol=1e-10, rtol=0)
        ga = torch.autograd.grad(ya.square().sum(), [h, *a.parameters()])
        gb = torch.autograd.grad(yb.square().sum(), [h, *b.parameters()])
        for x, y in zip(ga, gb):
            assert torch.allclose(x, y, atol=1e-9, rtol=0)
    # the border response differs from the interior one: zero padding is part of the identity
    w = a.convs[0].weight[:, 16:]
    resp = torch.nn.functional.conv2d(torch.ones(1, 1, 8, 8, dtype=torch.float64), w, padding=1)
    assert not torch.allclose(resp[..., 0, 0], resp[..., 4, 4])


def test_a_solve_prepares_each_convs_weights_once_and_backpropagates_through_them(monkeypatch):
    """Within one solve f's evaluations share each conv's sliced weight and time response (made
    once per solve, not per evaluation); logits and every parameter's gradient through the whole
    solve equal the concatenation form's, which prepares nothing (float64)."""
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    # torchdiffeq's dopri5, all of whose evaluations run with autograd (nodekd's first-step rule runs f
    # without it, and the cache keeps one preparation per grad mode)
    cfg = dict(TINY_NODE, t1=3.0, solver_impl="torchdiffeq")
    a = build_model("node", node=dict(cfg, time_conv="aligned")).double()
    b = build_model("node", node=dict(cfg, time_conv="concat")).double()
    b.load_state_dict(a.state_dict())
    responses = []
    conv2d = torch.nn.functional.conv2d

    def spy(x, w, *args, **kw):
        if w.shape[1] == 1:   # a kernel's response to the constant time channel
            responses.append(w.shape)
        return conv2d(x, w, *args, **kw)

    monkeypatch.setattr(torch.nn.functional, "conv2d", spy)
    ya, yb = a(x), b(x)
    assert a.nfe_forward == b.nfe_forward > 6
    assert len(responses) == len(a.func.convs)             # once per conv, not once per evaluation
    assert a.func._solve_cache is None                      # dropped after the solve
    assert torch.allclose(ya, yb, atol=1e-10, rtol=0)
    ya.square().sum().backward()
    yb.square().sum().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-9, rtol=1e-7), name


# logits of each student option against the reference (fp32 IEEE, concatenated time channel),
# with the tolerance each is held to: bf16 rounds the convolutions' inputs to 8 mantissa bits
OPTIONS = [(dict(precision="tf32"), 1e-6), (dict(time_conv="aligned"), 1e-5), (dict(channels_last=True), 1e-5),
           (dict(precision="bf16"), 3e-2), (dict(precision="bf16", channels_last=True), 3e-2)]


@pytest.mark.parametrize("option,tol", OPTIONS)
def test_student_options_give_the_same_logits(option, tol):
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    ref_cfg = dict(TINY_NODE, precision="fp32", time_conv="concat", t1=2.0)
    torch.manual_seed(0)
    ref = build_model("node", node=ref_cfg).eval()
    torch.manual_seed(0)
    m = build_model("node", node=dict(ref_cfg, **option)).eval()
    with torch.no_grad():
        a, b = ref(x), m(x)
    scale = a.abs().max()
    assert (a - b).abs().max() <= tol * scale, ((a - b).abs().max() / scale).item()
    assert m.nfe_forward <= ref.nfe_forward + 12   # bf16 noise may cost dopri5 a rejected step or two
    loss = m(x).logsumexp(1).sum()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.func.parameters())


def test_a_checkpoint_with_removed_fields_still_loads(tmp_path):
    """compile and bf16_norms were removed from NODEConfig; checkpoints written before carry them and load."""
    from nodekd_ray.checkpoints import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    m = build_model("node", node=TINY_NODE).eval()
    save_checkpoint(str(tmp_path / "old.pt"), m, arch="node", num_classes=10, mean=(0.5,) * 3, std=(0.25,) * 3,
                    node=dict(TINY_NODE, compile=False, bf16_norms=False))
    loaded, ckpt = load_checkpoint(str(tmp_path / "old.pt"))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), m(x))
    with pytest.raises(TypeError):
        NODEConfig(compile=True)


def _saved_bytes_and_grads(model, x):
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(x)
    logits.square().sum().backward()
    return logits.detach(), sum(saved.values()), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("option, dtype, tol", [
    (dict(precision="fp32"), torch.float64, 1e-12),
    (dict(precision="fp32", solver_impl="nodekd"), torch.float32, 1e-6),
    # bf16: a solve's contributions to a conv's bf16 weight gradient are summed in bf16, and the
    # autograd engine visits the two graphs' nodes in a different order: differences of bf16 rounding
    (dict(precision="bf16"), torch.float32, 2e-3),
    (dict(precision="bf16", channels_last=True), torch.float32, 2e-3),
    (dict(precision="fp32", time_input="none"), torch.float64, 1e-12),
])
def test_recompute_keeps_fewer_states_and_gives_the_same_gradients(option, dtype, tol):
    """recompute: the backward recomputes GroupNorm + ReLU. Same logits, same gradients (same ops in
    the same dtypes, autocast included), and at most 0.7 of the bytes autograd keeps for the backward."""
    x = torch.rand(3, 3, 32, 32, dtype=dtype)
    out = {}
    for recompute in (False, True):
        torch.manual_seed(0)
        m = NeuralODE(NODEConfig(width=32, stem_channels=8, t1=1.0, recompute=recompute, **option)).to(dtype)
        out[recompute] = _saved_bytes_and_grads(m, x) + (m.nfe_forward, m.nfe_backward)
    (l0, b0, g0, f0, k0), (l1, b1, g1, f1, k1) = out[False], out[True]
    assert (f0, k0) == (f1, k1)
    assert torch.equal(l0, l1)                   # the forward is the same computation
    for a, b in zip(g0, g1):
        assert float((a - b).norm()) <= tol * float(a.norm()) + 1e-30
    assert b1 < 0.7 * b0, (b1, b0)


def test_recompute_is_checked():
    with pytest.raises(ConfigError, match="recompute"):
        NODEConfig(recompute=True, time_conv="concat").validate()


def test_bf16_weight_gradients_of_a_solve_are_summed_in_fp32(monkeypatch):
    """The solve's bf16 weight copies are made once, but each evaluation's weight gradient is summed
    in fp32, as autocast's own per-call casts would sum it. Reference: the same model with the fp32
    weight handed to the conv each evaluation (autocast casts it per call). Summed in bf16 instead,
    the two differ by about 6e-3."""
    import torch.nn.functional as F

    from nodekd_ray.models import ODEFunc

    def per_call_casts(self, i, conv, h):
        c, w = h.shape[1], conv.weight
        ones = torch.ones(1, 1, h.shape[2], h.shape[3])
        with torch.autocast("cpu", enabled=False):
            response = F.conv2d(ones, w[:, c:], None, 1, 1)
        return w[:, :c], response.to(torch.get_autocast_dtype("cpu"))

    x = torch.rand(4, 3, 32, 32)
    grads = {}
    for reference in (False, True):
        torch.manual_seed(0)
        m = NeuralODE(NODEConfig(width=32, stem_channels=8, t1=1.0, precision="bf16"))
        with monkeypatch.context() as mp:
            if reference:
                mp.setattr(ODEFunc, "_aligned_weights", per_call_casts)
            m(x).square().sum().backward()
        grads[reference] = [c.weight.grad.clone() for c in m.func.convs]
    for a, b in zip(grads[False], grads[True]):
        assert float((a - b).norm() / b.norm()) < 1e-6
