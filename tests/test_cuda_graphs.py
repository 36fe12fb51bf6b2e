"""nodekd_ray/cuda_graphs.py on a CPU: the slot bookkeeping, counting and guard, with an eager stand-in for
torch.cuda.make_graphed_callables that keeps each slot's inputs in static buffers and its autograd graph until
the slot is reused, as CUDA graphs keep their activations (benchmarks/check_graphs.py checks the real graphs on
a GPU)."""
import copy

import pytest
import torch

from nodekd_ray.cuda_graphs import FIRST_CHUNK, GraphedSolves
from nodekd_ray.errors import ConfigError
from nodekd_ray.models import NODEConfig, NeuralODE


def static_slots(callables, sample_args, func):
    """Like make_graphed_callables: one autograd node per slot; the slot's inputs are copied into its own
    buffers, and its backward differentiates the slot's last forward, whatever that was. Replays run no
    Python, so f's own counting is undone here (GraphedSolves counts replays)."""
    slots = []

    def uncounted(run):
        counts = (func.nfe, func.nfe_backward)
        out = run()
        func.nfe, func.nfe_backward = counts
        return out

    for fn, static in zip(callables, sample_args):
        state = {}

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


@pytest.mark.parametrize("kw", [dict(adjoint=True), dict(solver="rk4"), dict(solver_impl="torchdiffeq"),
                                dict(compile=True)])
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
