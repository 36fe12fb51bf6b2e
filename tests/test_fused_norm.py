"""nodekd_ray/speed/fused_norm.py: the Triton GroupNorm (+ ReLU) kernels, run here in Triton's interpreter
(TRITON_INTERPRET=1), against float64 PyTorch; and norm_impl "triton" in the student."""
import pytest
import torch
import torch.nn.functional as F

from nodekd_ray.speed import fused_norm
from nodekd_ray.errors import ConfigError
from nodekd_ray.models import NeuralODE, NODEConfig

pytestmark = pytest.mark.skipif(not fused_norm.available(), reason="triton is not installed")


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def reference(x, groups, gamma, beta, relu):
    """float64 PyTorch: the independent computation."""
    y = F.group_norm(x.double(), groups, gamma.double(), beta.double(), 1e-5)
    return F.relu(y) if relu else y


def _inputs(seed, shape=(3, 64, 8, 8), channels_last=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3 + 1.5).to(dtype)   # an offset mean: a one-pass variance would lose digits
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    gamma = torch.randn(shape[1], generator=g)
    beta = torch.randn(shape[1], generator=g)
    return x, gamma, beta, torch.randn(shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("relu", [True, False])
def test_kernels_match_float64_group_norm_forward_and_backward(interpret, channels_last, relu):
    x, gamma, beta, w = _inputs(0, channels_last=channels_last)
    leaves = [t.clone().requires_grad_() for t in (x, gamma, beta)]
    y = fused_norm.group_norm_act(*leaves[:1], 4, *leaves[1:], 1e-5, relu=relu)
    assert y.dtype == torch.float32 and y.is_contiguous(memory_format=torch.channels_last) == channels_last
    (y.double() * w).sum().backward()
    ref_leaves = [t.double().clone().requires_grad_() for t in (x, gamma, beta)]
    ref = reference(ref_leaves[0], 4, ref_leaves[1], ref_leaves[2], relu)
    (ref * w).sum().backward()
    assert (y.double() - ref).abs().max() < 5e-6
    for got, want in zip(leaves, ref_leaves):
        err = (got.grad.double() - want.grad).abs().max() / want.grad.abs().max()
        assert err < 5e-6, err
    if relu:   # the backward's ReLU mask is the forward's: no gradient reaches x through a zero output
        assert ((y == 0).sum() > 0) and torch.equal(leaves[0].grad[y == 0] == 0, (ref_leaves[0].grad == 0)[y == 0])


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_time_term_is_added_inside_the_kernels_with_its_gradients(interpret, channels_last):
    """time=(t, response): the norm of x + t * response (response (1, C, H, W), broadcast over the batch),
    against float64 PyTorch; gradients for x, gamma, beta, t and the response."""
    x, gamma, beta, w = _inputs(4, channels_last=channels_last)
    g = torch.Generator().manual_seed(5)
    t, r = torch.tensor(0.7), torch.randn(1, 64, 8, 8, generator=g) * 2
    leaves = [v.clone().requires_grad_() for v in (x, gamma, beta, t, r)]
    y = fused_norm.group_norm_act(leaves[0], 4, leaves[1], leaves[2], 1e-5, time=(leaves[3], leaves[4]))
    (y.double() * w).sum().backward()
    ref_leaves = [v.double().clone().requires_grad_() for v in (x, gamma, beta, t, r)]
    xt = ref_leaves[0] + ref_leaves[3] * ref_leaves[4]
    ref = reference(xt, 4, ref_leaves[1], ref_leaves[2], True)
    (ref * w).sum().backward()
    assert (y.double() - ref).abs().max() < 5e-6
    for got, want in zip(leaves, ref_leaves):
        assert (got.grad.double() - want.grad).abs().max() / want.grad.abs().max() < 5e-6
    outside = fused_norm.group_norm_act(x + t * r, 4, gamma, beta, 1e-5)   # the same as adding it outside
    assert (y.detach() - outside).abs().max() < 5e-6
    monkey = pytest.MonkeyPatch()
    monkey.delenv("TRITON_INTERPRET")
    try:   # PyTorch's ops with the same arithmetic, on a CPU outside the interpreter
        assert (fused_norm.group_norm_act(x, 4, gamma, beta, 1e-5, time=(t, r)) - y.detach()).abs().max() < 5e-6
    finally:
        monkey.undo()


def test_group_sizes_that_are_not_powers_of_two_and_odd_shapes(interpret):
    """24 channels in 3 groups of 8 on a 5 x 7 map (masked lanes in both block dimensions)."""
    x, gamma, beta, w = _inputs(1, shape=(2, 24, 5, 7))
    leaves = [t.clone().requires_grad_() for t in (x, gamma, beta)]
    y = fused_norm.group_norm_act(leaves[0], 3, leaves[1], leaves[2], 1e-5)
    (y.double() * w).sum().backward()
    ref_leaves = [t.double().clone().requires_grad_() for t in (x, gamma, beta)]
    (reference(ref_leaves[0], 3, ref_leaves[1], ref_leaves[2], True) * w).sum().backward()
    assert (y.double() - reference(x, 3, gamma, beta, True)).abs().max() < 5e-6
    for got, want in zip(leaves, ref_leaves):
        assert (got.grad.double() - want.grad).abs().max() / want.grad.abs().max() < 5e-6


def test_bf16_input_is_read_as_bf16_and_written_in_the_autocast_dtype_from_fp32_statistics(interpret):
    x, gamma, beta, _ = _inputs(2, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fused_norm.group_norm_act(x, 4, gamma, beta, 1e-5)
    assert y.dtype == torch.bfloat16
    wide = fused_norm.group_norm_act(x, 4, gamma, beta, 1e-5, out_dtype=torch.float32)
    assert (wide.double() - reference(x, 4, gamma, beta, True)).abs().max() < 5e-6   # fp32 statistics and affine
    # The bf16 output is the fp32 result, rounded once. Triton's interpreter rounds fp32 -> bf16 by truncation
    # (runtime/interpreter.py, cast_impl), where compiled kernels round to nearest (PTX cvt.rn): here it must
    # be the truncated fp32 value, bit for bit.
    truncated = (wide.view(torch.int32) >> 16).to(torch.int16).view(torch.bfloat16)
    assert torch.equal(y, truncated)
    # the final norm of f: bf16 in, fp32 out, no ReLU
    z = fused_norm.group_norm_act(x, 4, gamma, beta, 1e-5, relu=False, out_dtype=torch.float32)
    assert z.dtype == torch.float32 and (z.double() - reference(x, 4, gamma, beta, False)).abs().max() < 5e-6


def test_cpu_tensors_outside_the_interpreter_take_torch_ops_with_the_same_arithmetic(monkeypatch):
    x, gamma, beta, _ = _inputs(3)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    kernel = fused_norm.group_norm_act(x, 4, gamma, beta, 1e-5)
    monkeypatch.delenv("TRITON_INTERPRET")
    fallback = fused_norm.group_norm_act(x, 4, gamma, beta, 1e-5)
    assert (kernel - fallback).abs().max() < 5e-6


def _student(norm_impl, **kw):
    """A small student whose biases and norm affines are moved off their initial 0 and 1, the same for every
    norm_impl (a bias of 0 would hide a kernel that forgets to add it)."""
    torch.manual_seed(0)
    m = NeuralODE(NODEConfig(width=32, stem_channels=8, t1=1.0, rtol=1e-2, atol=1e-2, norm_impl=norm_impl, **kw),
                  in_channels=3)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return m


@pytest.mark.parametrize("kw, tol", [(dict(precision="fp32"), 1e-5),
                                     (dict(precision="fp32", solver_impl="nodekd"), 1e-5),
                                     (dict(precision="fp32", recompute=True, solver_impl="nodekd"), 1e-5),
                                     (dict(precision="fp32", time_conv="concat"), 1e-5),
                                     (dict(precision="fp32", time_input="none"), 1e-5),
                                     (dict(precision="fp32", time_input="scaled", channels_last=True), 1e-5),
                                     (dict(precision="bf16"), 3e-2)])
def test_student_with_triton_norms_matches_torch_norms(interpret, kw, tol):
    """Logits, NFE and every parameter's gradient: f's convs (the time column included), their biases
    (added inside the next norm's kernel), every norm's gamma and beta, and the stem and head. With
    the aligned time conv these gradients are summed over the solve by the kernels (SolveGrads)."""
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    outs = {}
    for impl in ("torch", "triton"):
        m = _student(impl, **kw)
        logits = m(x)
        logits.square().sum().backward()
        outs[impl] = (logits.detach(), m.nfe_forward, {k: p.grad for k, p in m.named_parameters()})
    (lt, nt, gt), (lk, nk, gk) = outs["torch"], outs["triton"]
    assert nt == nk
    assert (lt - lk).abs().max() / lt.abs().max() < tol
    assert gt.keys() == gk.keys() and all(g is not None for g in gk.values())
    # Each path against float64 (bf16 is far from exact here: the stem's gradient is about 0.3 off fp64 at
    # this width with 2 images): the kernels must be no worse than PyTorch's ops, and in fp32 near exact
    ref = _student("torch", **{**kw, "precision": "fp32"}).double()
    ref(x.double()).square().sum().backward()
    floor = 2e-5 if kw["precision"] == "fp32" else 1e-3
    for k, p in ref.named_parameters():
        err = {impl: float((g[k].double() - p.grad).norm() / p.grad.norm()) for impl, g in (("torch", gt), ("triton", gk))}
        assert err["triton"] <= 1.25 * err["torch"] + floor, (k, err)


@pytest.mark.slow
def test_summed_gradients_survive_a_second_backward_pass_and_input_only_gradients(interpret):
    """A graph backpropagated twice (retain_graph) gives the same gradients twice: SolveGrads' sums are
    cleared when delivered. An attack's gradient with respect to the input alone is the torch path's."""
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    m = _student("triton", precision="fp32")
    loss = m(x).square().sum()
    loss.backward(retain_graph=True)
    first = {k: p.grad.clone() for k, p in m.named_parameters()}
    m.zero_grad()
    loss.backward()
    for k, p in m.named_parameters():
        assert torch.allclose(p.grad, first[k], rtol=1e-6, atol=1e-9), k
    # Each fp32 path against float64, not against each other: torchdiffeq differentiates through its
    # first step's size, a term built from (f(y0 + h0 f0) - f0) / h0 that rounding in fp32 makes noisy
    # (here 1.2% of the gradient; either path lands 2e-6 .. 6e-4 off float64 depending on the input),
    # so two correct fp32 paths can differ by more than either differs from float64.
    xd = x.double().requires_grad_()
    exact, = torch.autograd.grad(_student("torch", precision="fp32").double()(xd).square().sum(), xd)
    err = {}
    for impl in ("torch", "triton"):
        xi = x.clone().requires_grad_()
        g, = torch.autograd.grad(_student(impl, precision="fp32")(xi).square().sum(), xi)
        err[impl] = float((g.double() - exact).norm() / exact.norm())
    assert err["triton"] <= 1.25 * err["torch"] + 2e-5, err


@pytest.mark.parametrize("kw", [dict(norm_impl="cudnn"), dict(norm_impl="torchish")])
def test_norm_impl_is_checked(kw):
    with pytest.raises(ConfigError, match="norm_impl"):
        NODEConfig(**kw).validate()


def test_training_with_triton_norms_on_a_cpu_is_refused():
    from nodekd_ray.train import StudentConfig, train_student

    cfg = StudentConfig(dataset="synthetic", kd=False, device="cpu", node=NODEConfig(width=16, norm_impl="triton"))
    with pytest.raises(ConfigError, match="norm_impl: 'triton' runs its kernels on a CUDA device"):
        train_student(cfg)


def test_every_norm_of_f_runs_through_the_kernels_and_the_op_count_says_so(interpret):
    """benchmarks/bench_norm.py's count: with norm_impl "triton" no PyTorch GroupNorm or ReLU is left in an
    evaluation of f (forward and backward), and each of its 5 norms launches one kernel each way."""
    import importlib.util
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("bench_norm", os.path.join(root, "benchmarks", "bench_norm.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.count_f(torch.device("cpu"), "tf32")
    torch_ops, kernel_ops = rows["torch"][2], rows["triton"][2]
    assert rows["torch"][1] == 0 and rows["triton"][1] == 10
    assert torch_ops["native_group_norm"] == torch_ops["native_group_norm_backward"] == 5
    assert torch_ops["relu"] == torch_ops["threshold_backward"] == 4
    assert not {"native_group_norm", "native_group_norm_backward", "relu", "threshold_backward"} & set(kernel_ops)
    assert torch_ops["convolution"] == kernel_ops["convolution"] == 4   # the rest of f is the same
    # within a solve: no per-evaluation reductions or multiplies for the parameters' gradients and the time
    # term (SolveGrads), and well under half of PyTorch's operations in all
    assert "sum" not in kernel_ops and "mul" not in kernel_ops and torch_ops["sum"] == 4
    assert rows["triton"][0] + rows["triton"][1] < 0.4 * rows["torch"][0]


@pytest.mark.parametrize("dt_in, dt_out", [("fp32", "fp32"), ("bf16", "bf16"), ("bf16", "fp32")])
@pytest.mark.parametrize("has_t, acc", [(False, False), (False, True), (True, False), (True, True)])
def test_kernels_compile_for_an_h100_without_one(dt_in, dt_out, has_t, acc):
    """The interpreter runs the kernels' Python; this is the compiled path: Triton's own compiler takes both
    kernels to an sm_90 cubin here (ptxas included; no GPU needed), with the shapes of f at width 512, and a
    bf16 output is rounded to nearest (cvt.rn), not truncated as the interpreter does."""
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fwd, bwd = fused_norm._kernels(False)
    meta = dict(CG=16, BLOCK_C=16, BLOCK_S=64, RELU=True, HAS_B=has_t, HAS_T=has_t, ACC=acc)
    ptr = dict(x_ptr=dt_in, dx_ptr=dt_in, y_ptr=dt_out, dz_ptr=dt_out)   # every other pointer is fp32

    def signature(kernel):
        names = inspect.signature(kernel.fn).parameters
        return {n: "constexpr" if n in meta else f"*{ptr.get(n, 'fp32')}" if n.endswith("_ptr")
                else "fp32" if n == "eps" else "i32" for n in names}

    def constants(kernel):
        return {n: v for n, v in meta.items() if n in inspect.signature(kernel.fn).parameters}

    for kernel in (fwd, bwd):   # every constexpr of the kernels is given here (none compiled as a runtime int)
        consts = [n for n, a in inspect.signature(kernel.fn).parameters.items() if "constexpr" in str(a.annotation)]
        assert consts and set(consts) <= set(meta), consts

    target, opts = GPUTarget("cuda", 90, 32), {"enable_fp_fusion": True}   # as fused_norm launches them
    f, b = (triton.compile(ASTSource(k, signature(k), constants(k)), target=target, options=opts) for k in (fwd, bwd))
    for k in (f, b):
        assert k.asm["cubin"] and k.metadata.target.arch == 90
    assert ("cvt.rn.bf16.f32" in f.asm["ptx"]) == (dt_out == "bf16")
    assert ("cvt.rn.bf16.f32" in b.asm["ptx"]) == (dt_in == "bf16")
