"""nodekd_ray/speed/cuda_graphs.py on a CPU: the slot bookkeeping, counting and guard, with an eager stand-in for
torch.cuda.make_graphed_callables that keeps each slot's inputs in static buffers and its autograd graph until
the slot is reused, as CUDA graphs keep their activations (benchmarks/check_graphs.py checks the real graphs on
a GPU)."""
import copy

import pytest
import torch

from nodekd_ray.speed.cuda_graphs import FIRST_CHUNK, GraphedSolves
from nodekd_ray.errors import ConfigError
from nodekd_ray.models import NODEConfig, NeuralODE


def static_slots(callables, sample_args, func):
    """Like make_graphed_callables: one autograd node per slot; the slot's inputs are copied into its own
    buffers, and its backward differentiates the slot's last forward, whatever that was. Replays run no
    Python, so f's own counting is undone here (GraphedSolves counts replays). A replay runs f as it was
    captured: with the solve's shared inputs (func.graph_inputs) where they were set for the capture. Like
    make_graphed_callables, each slot first runs a warm-up forward and backward (whose side effects, such as
    sums added into shared inputs, GraphedSolves must undo)."""
    slots = []
    shared = func.graph_inputs

    def uncounted(run):
        counts, inputs = (func.nfe, func.nfe_backward), func.graph_inputs
        func.graph_inputs = shared
        try:
            out = run()
        finally:
            func.graph_inputs = inputs
        func.nfe, func.nfe_backward = counts
        return out

    for fn, static in zip(callables, sample_args):
        state = {}
        with torch.enable_grad():   # the warm-up
            y = uncounted(lambda: fn(*static))
            uncounted(lambda: torch.autograd.grad(y, [x for x in static if x.requires_grad], torch.ones_like(y)))

        class Slot(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *inputs, fn=fn, static=static, state=state):
                for buf, x in zip(static[:2], inputs[:2]):
                    buf.copy_(x)
                with torch.enable_grad():
                    state["y"] = uncounted(lambda: fn(*static))
                return state["y"].detach().clone()

            @staticmethod
            def backward(ctx, grad, static=static, state=state):
                return (None, *uncounted(lambda: torch.autograd.grad(state["y"], static[1:], grad)))

        slots.append(Slot.apply)
    return slots


def pair(**kw):
    torch.manual_seed(0)
    cfg = dict(width=16, stem_channels=8, precision="fp32", **kw)
    eager = NeuralODE(NODEConfig(**cfg)).double()
    graphed = NeuralODE(NODEConfig(**cfg, cuda_graphs=True)).double()
    graphed.load_state_dict(eager.state_dict())
    graphed._graphs = GraphedSolves(graphed.func, make_graphed=lambda c, a: static_slots(c, a, graphed.func))
    return eager, graphed


def step(model, x, y):
    model.zero_grad(set_to_none=True)
    logits = model(x)
    torch.nn.functional.cross_entropy(logits, y).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kw", [dict(t1=1.0), dict(t1=20.0), dict(t1=1.0, channels_last=True, norm_impl="triton")])
def test_graphed_solves_give_eager_logits_gradients_and_nfe_over_training_steps(kw):
    """Two training steps with an Adam update between them (the slots read the updated weights in place), at
    a horizon whose solves need more than the first chunk of slots, and in channels-last memory format (each
    slot's input buffers keep the state's strides): the same logits, gradients and NFE as the eager student,
    in float64."""
    eager, graphed = pair(**kw)
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 3, 7])
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (eager, graphed)]
    for _ in range(2):
        (la, ga), (lb, gb) = step(eager, x, y), step(graphed, x, y)
        assert torch.allclose(la, lb, rtol=0, atol=1e-12)
        for n in ga:
            assert torch.allclose(ga[n], gb[n], rtol=1e-9, atol=1e-12), n
        assert (eager.nfe_forward, eager.nfe_backward) == (graphed.nfe_forward, graphed.nfe_backward)
        for o in opts:
            o.step()
    g = graphed._graphs
    per_solve = graphed.nfe_forward // 2 - 1          # the first-step rule's probe runs without autograd
    assert len(g.slots) >= per_solve and g.solves == 2
    assert (g.captures > 1) == (per_solve > FIRST_CHUNK)
    assert g.captures == len(bin(max(1, (len(g.slots) // FIRST_CHUNK)))) - 2   # chunks of 8, 8, 16, 32, ...


def test_a_second_solve_before_the_first_ones_backward_is_refused():
    _, graphed = pair()
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    first = graphed(x).sum()
    graphed(x + 0.1).sum().backward()               # the second solve's own backward is fine
    with pytest.raises(RuntimeError, match="cuda_graphs: a solve's backward ran after another solve"):
        first.backward()


def test_a_new_batch_size_gets_its_own_graphs_the_last_two_are_kept_and_without_autograd_f_runs_eagerly():
    eager, graphed = pair()
    x = torch.rand(4, 3, 32, 32, dtype=torch.float64)
    step(graphed, x, torch.arange(4))
    g = graphed._graphs
    full, captures = g.slots, g.captures
    step(graphed, x[:3], torch.arange(3))           # an epoch's smaller last batch: a set of its own
    assert g.slots is not full and g.captures > captures
    captures = g.captures
    (la, ga), (lb, gb) = step(eager, x, torch.arange(4)), step(graphed, x, torch.arange(4))
    assert g.slots is full and g.captures == captures           # the next epoch's full batch: no recapture
    assert torch.allclose(la, lb, rtol=0, atol=1e-12) and all(torch.allclose(ga[n], gb[n]) for n in ga)
    step(graphed, x[:2], torch.arange(2))
    step(graphed, x[:1], torch.arange(1))           # a third and a fourth size: the full batch's set is dropped
    step(graphed, x, torch.arange(4))
    assert g.slots is not full and len(g.sets) == 2
    with torch.no_grad():
        assert torch.allclose(graphed(x), eager(x), rtol=0, atol=1e-12)
    assert g.solves == 6                            # the no-grad solve took no slots


def test_a_copy_of_a_graphed_student_captures_its_own_graphs():
    _, graphed = pair()
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    step(graphed, x, torch.arange(2))
    twin = copy.deepcopy(graphed)
    assert twin._graphs.func is twin.func and twin._graphs.slots == []


def test_on_a_cpu_the_real_option_runs_f_eagerly():
    torch.manual_seed(0)
    a = NeuralODE(NODEConfig(width=16, stem_channels=8))
    b = NeuralODE(NODEConfig(width=16, stem_channels=8, cuda_graphs=True))
    b.load_state_dict(a.state_dict())
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(a(x), b(x)) and b._graphs.slots == []


@pytest.mark.parametrize("kw", [dict(adjoint=True), dict(solver="rk4"), dict(solver_impl="torchdiffeq")])
def test_cuda_graphs_needs_the_nodekd_solver(kw):
    with pytest.raises(ConfigError, match="cuda_graphs: needs the nodekd solver"):
        NODEConfig(cuda_graphs=True, **kw).validate()


def test_no_garbage_collection_runs_while_a_chunk_is_captured():
    """make_graphed_callables' graphs (before pytorch/pytorch#195397) are freed by the cyclic collector, and
    freeing one during another capture invalidates it: the capture runs with the collector off, after a
    collection, and the collector is back on afterwards (also when the capture fails)."""
    import gc

    seen = []

    def spy(callables, sample_args):
        seen.append(gc.isenabled())
        if len(seen) == 2:
            raise RuntimeError("capture failed")
        return [lambda *a, c=c: c(*a) for c in callables]

    torch.manual_seed(0)
    graphed = NeuralODE(NODEConfig(width=16, stem_channels=8, cuda_graphs=True))
    graphed._graphs = GraphedSolves(graphed.func, make_graphed=spy)
    x = torch.rand(2, 3, 32, 32)
    with pytest.raises(RuntimeError, match="capture failed"):   # the solve needs a second chunk, whose capture fails
        graphed(x)
    assert seen == [False, False] and gc.isenabled()
    assert graphed.func._solve_cache is None and graphed.func.graph_capture is False


@pytest.fixture
def interpret(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_graphs_with_a_solves_shared_inputs_give_the_eager_students_logits_and_gradients_exactly(interpret, precision):
    """f's fused path (Triton norms, here in Triton's interpreter) takes a solve's shared inputs in the graphs
    (cuda_graphs.GraphSolveInputs): the slots take only (t, h); the convs read the solve's prepared weights and add
    their weight gradients into its buffers, the norms their parameters' gradients, and the sums reach autograd
    once per solve. That is the arithmetic of the eager solve (ODEFunc.solving, fused_norm.SolveGrads), so the
    logits and every gradient are bit for bit the eager ones, over Adam steps, with the stand-in's warm-up
    passes adding into the sums during each capture (GraphedSolves restores them) and a forward whose backward
    never ran before the second step (the next solve starts its sums afresh)."""
    torch.manual_seed(0)
    cfg = dict(width=16, stem_channels=8, precision=precision, norm_impl="triton")
    eager = NeuralODE(NODEConfig(**cfg))
    graphed = NeuralODE(NODEConfig(**cfg, cuda_graphs=True))
    graphed.load_state_dict(eager.state_dict())
    graphed._graphs = GraphedSolves(graphed.func, make_graphed=lambda c, a: static_slots(c, a, graphed.func),
                                    share_inputs=True)
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 3, 7])
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (eager, graphed)]
    for i in range(2):
        if i == 1:
            graphed(x + 0.5)                          # its backward never runs: its sums must not leak
        before = [(m.nfe_forward, m.nfe_backward) for m in (eager, graphed)]
        (la, ga), (lb, gb) = step(eager, x, y), step(graphed, x, y)
        assert torch.equal(la, lb)
        for n in ga:
            assert torch.equal(ga[n], gb[n]), n
        (ef, eb), (gf, gbw) = before
        assert (eager.nfe_forward - ef, eager.nfe_backward - eb) == (graphed.nfe_forward - gf, graphed.nfe_backward - gbw)
        for o in opts:
            o.step()
    g = graphed._graphs
    assert g.current.inputs is not None and g.captures >= 2          # chunks of 8 then 8 or more
    assert all(s.slots for s in g.sets.values())


def test_without_the_kernels_the_graphs_take_the_parameters_per_evaluation():
    """PyTorch's fallback ops (a CPU outside the interpreter) would not add into a solve's sums: there f's
    graphs take the parameters as inputs, per evaluation, as for PyTorch's norms, even when asked to share."""
    _, graphed = pair(norm_impl="triton")
    graphed._graphs.share_inputs = True
    step(graphed, torch.rand(2, 3, 32, 32, dtype=torch.float64), torch.arange(2))
    assert graphed._graphs.current.inputs is None and graphed._graphs.slots


def test_shared_inputs_are_the_default_where_f_allows_but_not_channels_last():
    """The models' graphs take a solve's shared inputs (checked on an H200) unless told per-evaluation; a
    channels-last state takes per-evaluation graphs (on an H200 its shared inputs failed the capturing step)."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)
    for cfg, shared in [(dict(), True), (dict(graph_inputs="per-evaluation"), False)]:
        model = NeuralODE(NODEConfig(width=16, stem_channels=8, norm_impl="triton", cuda_graphs=True, **cfg))
        model(x)                       # on a CPU f runs eagerly; the graphs' object is made all the same
        assert model._graphs.share_inputs is shared
    assert GraphedSolves(model.func).share_inputs is True
    h = torch.rand(2, 16, 8, 8)
    with pytest.MonkeyPatch.context() as mp:   # as on a GPU, where the kernels run
        mp.setattr(model.func._fused, "kernels_apply", lambda h0, groups: True)
        from nodekd_ray.speed.cuda_graphs import can_share_inputs

        assert can_share_inputs(model.func, h)
        assert not can_share_inputs(model.func, h.contiguous(memory_format=torch.channels_last))


def test_graph_inputs_is_checked_and_a_student_with_triton_norms_copies_for_another_solver():
    from nodekd_ray.attacks import with_solver

    with pytest.raises(ConfigError, match="graph_inputs: .*per-evaluation"):
        NODEConfig(graph_inputs="some").validate()
    model = NeuralODE(NODEConfig(width=16, stem_channels=8, norm_impl="triton", cuda_graphs=True))
    model(torch.rand(2, 3, 32, 32))
    rk4 = with_solver(model, solver="rk4")    # a deep copy: fused_norm is no attribute of f (modules don't copy)
    assert not rk4.cfg.cuda_graphs and rk4.func._fused is model.func._fused
