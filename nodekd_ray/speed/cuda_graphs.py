"""f's evaluations in a training solve replayed from CUDA graphs (NODEConfig.cuda_graphs; plain PyTorch).

Why: on a GPU the width-512 student's training step is bound by kernel launches, not arithmetic. On an
H200 one launch from Python cost 10.5 us against 1.1 us replayed from a CUDA graph, and bf16 f with the
Triton norms ran at 20.9% MFU eagerly against 44.5% replayed (benchmarks/bench_graphs.py, README
"Measured on one H200").

How: ``torch.cuda.make_graphed_callables`` captures a callable's forward and backward as two CUDA graphs
inside one autograd node. One such node cannot serve a solve on its own: its inputs, outputs and saved
activations live in static buffers, and a solve calls f 14 to 100+ times before its one backward pass, so
each call would overwrite the activations of the one before. Here a solve's k-th evaluation of f with
autograd is replayed from slot k, a graph pair of its own with its own input buffers, its own outputs and
its own saved activations. Slots are captured in chunks (8, then as many again as there are, ...): one
make_graphed_callables call per chunk, whose captures share one memory pool in the order that the
live workload runs them, forwards 1..n then backwards n..1. A solve runs its evaluations in that order,
and autograd runs their backwards in reverse order of creation. The backward of an evaluation in a
rejected step never runs; that only leaves memory unread.

A solve's shared inputs (share_inputs, the default): an eager solve prepares each conv's weights
once and the Triton norms sum their parameters' gradients over its evaluations (ODEFunc.solving). Graphs of
single evaluations cannot reach that per-solve state, so without it each replays its own weight preparation
and hands autograd its own parameter gradients. On an H200 that cost 925 kernels and 4.1 ms per training step
(README, "f's MFU inside a training step"). With share_inputs, for f's fused path, the slots take (t, h) only,
and the state lives in fixed buffers (GraphSolveInputs, below). Each solve fills the prepared weights and
responses and clears the sums. Inside the graphs the norms add into the sums, and the convs add their weight
gradients (ConvInto, below). A node on the solve's initial state hands the sums to autograd once, after every
evaluation's backward. make_graphed_callables' warm-up passes add into the sums while a chunk is captured,
so they are saved before each capture and restored after.

What runs eagerly: evaluations without autograd (the first-step rule's probe, noise-aware control's
reference, evaluation and test passes), a state or parameters that do not require grad, and every
CPU solve. The solver's own arithmetic between evaluations stays eager too: its step control reads the
error ratio on the host once per step.

Counting: NFE forward and backward are counted per replay (_Guard), as ODEFunc counts eager calls.

A second solve that reuses slot k before the first solve's backward has run would silently give the first
solve the second's activations; _Guard's backward refuses it with a RuntimeError instead. One training
step is one solve then its backward, which is what training and the attacks do.

Graphs are kept per (state shape, strides, dtype, device, autocast state, parameter storage): a change of
any of them (an epoch's last, smaller batch; the model moved) captures a new set of slots. The two sets used
last are kept, so that an epoch's full batches and its last one do not recapture every epoch.
"""
from __future__ import annotations

import contextlib
import gc
import warnings

import torch
import torch.nn.functional as F

from ..models import _count_vjp, _cudnn_conv_precision

FIRST_CHUNK = 8
KEPT_SETS = 2


def can_share_inputs(func, h0: torch.Tensor) -> bool:
    """Whether CUDA graphs of f (an ODEFunc) can take a solve's shared inputs (GraphSolveInputs) for state h0: f's
    fused path (Triton norms, the aligned time conv, no recompute), with the kernels running (they sum the norms'
    gradients into the solve's buffers; PyTorch's fallback ops would not), and an NCHW state. On an H200,
    channels-last with shared inputs failed benchmarks/check_graphs.py in its capturing step (gradients 15% off
    eager; docs/performance.md, "A solve's shared inputs in the graphs"), not yet explained: a channels-last
    state takes per-evaluation graphs."""
    return bool(func._fused) and not func.recompute and func.time_input != "none" and \
        func.time_conv == "aligned" and h0.is_contiguous() and func._fused.kernels_apply(h0, func.norms[0].num_groups)


# ----------------------------------------------------------------------------- a solve's shared inputs

class ConvInto(torch.autograd.Function):
    """conv3x3(a, w) (stride 1, padding 1, no bias) whose weight gradient is added into ``into`` (in its dtype,
    fp32) in place instead of being returned: f's convs inside a CUDA graph that reads a solve's prepared
    weights (GraphSolveInputs). Its backward is autograd's ConvolutionBackward0's one call, and the fp32 sum
    over the solve's evaluations is the one _SharedCast makes eagerly."""

    @staticmethod
    def forward(ctx, a, w, into):
        ctx.save_for_backward(a, w)
        ctx.into = into
        return F.conv2d(a, w, None, 1, 1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        a, w = ctx.saved_tensors
        da, dw, _ = torch.ops.aten.convolution_backward(grad, a, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                                                        [ctx.needs_input_grad[0], True, False])
        ctx.into.add_(dw)
        return da, None, None


class GraphSolveInputs:
    """What one solve's evaluations of f share, in fixed buffers that CUDA graphs of f read and write
    (cuda_graphs.GraphedSolves, for f's fused path: can_share_inputs).

    Eagerly, a solve prepares each conv's weights once (ODEFunc.solving: the slice, the time response, the
    bf16 copy) and the Triton norms sum their parameters' gradients over the solve's evaluations
    (fused_norm.SolveGrads). A graph captured per evaluation cannot reach that per-solve state, so without
    this each graphed evaluation prepares its own weights and hands autograd its own parameter gradients:
    on an H200 that was 925 more kernels and 4.1 ms per training step than the eager step
    (benchmarks/results/h200-2026-12-04b/profile_kernels.txt). Here the state lives in buffers that outlive
    the solve: ``start`` fills the weights and responses from the parameters once per solve and clears the
    sums; inside the graphs the norms add into ``sums`` and the convs into ``weight_grads`` (ConvInto);
    ``start``'s _SolveDelivery node, on the solve's initial state, hands the sums to autograd once, after
    every evaluation's backward has run (they all depend on that state), as fused_norm._Deliver does."""

    def __init__(self, func, h0: torch.Tensor):
        n, c, hh, ww = h0.shape
        fmt = torch.channels_last if h0.is_contiguous(memory_format=torch.channels_last) and c > 1 \
            else torch.contiguous_format
        low = torch.bfloat16 if func.precision == "bf16" else func.convs[0].weight.dtype
        dev = h0.device
        self.weights = [torch.empty(cv.weight.shape[0], c, 3, 3, dtype=low, device=dev).contiguous(memory_format=fmt)
                        for cv in func.convs]
        self.weight_grads = [torch.zeros_like(w, dtype=cv.weight.dtype) for w, cv in zip(self.weights, func.convs)]
        self.responses = [torch.empty(1, cv.weight.shape[0], hh, ww, dtype=cv.weight.dtype, device=dev)
                          for cv in func.convs]
        self.sums = [func._fused.SolveGrads(n, c, hh * ww, i > 0, dev) for i in range(len(func.convs) + 1)]

    def _buffers(self) -> list:
        return self.weight_grads + [t for s in self.sums for t in (s.part, s.resp) if t is not None]

    def saved(self) -> list:
        """Copies of the sums (make_graphed_callables' warm-up backward passes add into them)."""
        return [t.clone() for t in self._buffers()]

    def restore(self, saved: list):
        for t, v in zip(self._buffers(), saved):
            t.copy_(v)

    def start(self, func, h0: torch.Tensor) -> torch.Tensor:
        """Fills the buffers from the parameters for a solve from h0; h0 as the solve's evaluations must see it."""
        c = h0.shape[1]
        ones = torch.ones(1, 1, h0.shape[2], h0.shape[3], dtype=func.convs[0].weight.dtype, device=h0.device)
        mains, responses = [], []
        conv_mode = _cudnn_conv_precision("tf32" if func.precision == "tf32" else "ieee") \
            if h0.is_cuda and func.precision != "bf16" else contextlib.nullcontext()
        with conv_mode, torch.autocast(h0.device.type, enabled=False):   # as ODEFunc._aligned_weights makes it
            for conv, w_buf, r_buf in zip(func.convs, self.weights, self.responses):
                main, response = conv.weight[:, :c], F.conv2d(ones, conv.weight[:, c:], None, 1, 1)
                with torch.no_grad():
                    w_buf.copy_(main)
                    r_buf.copy_(response)
                mains.append(main)
                responses.append(response)
        for t in self._buffers():
            t.zero_()
        norms = list(func.norms) + [func.norm_out]
        params = [n.weight for n in norms] + [n.bias for n in norms] + [cv.bias for cv in func.convs]
        return _SolveDelivery.apply(h0, self, *mains, *responses, *params)

    def totals(self) -> list:
        """The solve's gradients in start's order: each conv's weight over h's channels, each response, each
        norm's gamma, each norm's beta, each conv's bias; then the sums are cleared."""
        sums = [s.part.sum(1) for s in self.sums]            # (3, C) per norm: gamma, beta, previous conv's bias
        out = [g.clone() for g in self.weight_grads]
        out += [s.resp.sum(0) for s in self.sums[1:]]
        out += [p[0] for p in sums] + [p[1] for p in sums] + [p[2] for p in sums[1:]]
        for t in self._buffers():
            t.zero_()
        return out


class _SolveDelivery(torch.autograd.Function):
    """h0 unchanged; its backward hands a GraphSolveInputs' sums to the tensors they are the gradients of."""

    @staticmethod
    def forward(ctx, h0, inputs, *tensors):
        ctx.inputs = inputs
        ctx.like = [(t.shape, t.dtype) for t in tensors]
        return h0.view_as(h0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        totals = ctx.inputs.totals()
        return (grad, None, *(g.reshape(shape).to(dtype) for g, (shape, dtype) in zip(totals, ctx.like)))


class _Set:
    """The slots of one key: graphed callables (slot k for a solve's k-th evaluation with autograd) and the
    solve whose forward last ran in each."""

    def __init__(self):
        self.slots: list = []
        self.owner: list = []
        self.inputs = None           # GraphSolveInputs, where f's graphs take a solve's shared inputs


class _Guard(torch.autograd.Function):
    """Identity on a slot's output whose backward checks that the slot still holds this solve's
    activations, counts one vector-Jacobian product and sets the backward's conv precision (models._count_vjp)."""

    @staticmethod
    def forward(ctx, x, graphs, index, solve):
        ctx.graphs, ctx.index, ctx.solve = graphs, index, solve
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):

        g, s = ctx.graphs
        if s.owner[ctx.index] != ctx.solve:
            raise RuntimeError("cuda_graphs: a solve's backward ran after another solve had reused its CUDA graphs "
                               "(two forward passes before one backward); run each forward's backward first, or "
                               "train without cuda_graphs")
        _count_vjp(g.func, grad)
        return grad, None, None, None


# The parameters' AccumulateGrad nodes are made during make_graphed_callables' warm-up on its side stream and the
# captured graphs keep them alive, so every backward after that warns that their stream differs from the replay's.
# Intended here: the gradients are summed on that stream, and autograd syncs a backward's leaf streams with the
# caller's before it returns (check_graphs.py: gradients 2e-7 to 7e-6 off the eager path on an H200).
warnings.filterwarnings("ignore", message="The AccumulateGrad node's stream does not match", category=UserWarning)


class GraphedSolves:
    """The CUDA graphs of one ODEFunc's evaluations in training solves (see the module docstring)."""

    def __init__(self, func, make_graphed=None, share_inputs: bool = True):
        self.func = func
        # f's graphs take a solve's shared inputs where f allows (can_share_inputs,
        # GraphSolveInputs): bit-identical to the eager student on a CPU (tests/test_cuda_graphs.py), and on
        # an H200 as close to it as eager is to itself (benchmarks/check_graphs.py, against its "+pereval" rows)
        self.share_inputs = share_inputs
        self._make = make_graphed or torch.cuda.make_graphed_callables
        self._stand_in = make_graphed is not None   # tests' eager stand-in for make_graphed_callables: runs on a CPU
        self.sets: dict = {}         # key -> _Set, the most recently used last
        self.current = _Set()
        self.solves = 0              # solves that used graphs
        self._next = 0
        self.captures = 0            # make_graphed_callables calls (chunks captured)

    @property
    def slots(self) -> list:
        return self.current.slots

    def __deepcopy__(self, memo):    # graphs are not copied: a copy captures its own on first use
        import copy

        return GraphedSolves(copy.deepcopy(self.func, memo), self._make, self.share_inputs)

    def __getstate__(self):
        return {"func": self.func, "share_inputs": self.share_inputs}

    def __setstate__(self, state):
        self.__init__(state["func"], share_inputs=state.get("share_inputs", True))

    def begin(self, h0: torch.Tensor):
        """(f for dopri5, the initial state) for one solve from h0: graph replay where it applies, else (None, h0)
        (f runs eagerly). With shared inputs, the state returned carries the node that delivers their sums."""
        params = tuple(self.func.parameters())
        if not (h0.is_cuda or self._stand_in) or not torch.is_grad_enabled() or not h0.requires_grad \
                or not all(p.requires_grad for p in params):
            return None, h0
        key = (tuple(h0.shape), h0.stride(), h0.dtype, str(h0.device), torch.is_autocast_enabled(h0.device.type),
               tuple(p.data_ptr() for p in params))
        self.current = self.sets.pop(key, None) or _Set()
        self.sets[key] = self.current
        while len(self.sets) > KEPT_SETS:    # a pending backward keeps its own graphs alive; nothing reuses them
            del self.sets[next(iter(self.sets))]
        self.solves += 1
        self._next = 0
        if self.share_inputs and can_share_inputs(self.func, h0):

            if self.current.inputs is None:
                self.current.inputs = GraphSolveInputs(self.func, h0)
            h0 = self.current.inputs.start(self.func, h0)
        return self._evaluate, h0

    def _evaluate(self, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or not h.requires_grad:
            return self.func(t, h)
        s = self.current
        if self._next == len(s.slots):
            self._capture(s, max(FIRST_CHUNK, len(s.slots)), t, h)
        k = self._next
        self._next += 1
        s.owner[k] = self.solves
        self.func.nfe += 1
        out = s.slots[k](t, h) if s.inputs is not None else s.slots[k](t, h, *self.func.parameters())
        return _Guard.apply(out, (self, s), k, self.solves)

    def _capture(self, s: _Set, n: int, t: torch.Tensor, h: torch.Tensor):
        f = self.func
        counts = (f.nfe, f.nfe_backward)
        params = tuple(f.parameters())

        def evaluate(t_, h_, *_params):   # f reads its parameters itself; they are inputs for their gradients
            return f(t_, h_)

        # each slot its own input buffers: f's backward reads its saved input (GroupNorm's, the time term's t).
        # With shared inputs, the parameters' gradients go to s.inputs' sums instead: they are no inputs.
        shared = s.inputs
        args = tuple((t.detach().clone(), h.detach().clone().requires_grad_(), *(() if shared else params))
                     for _ in range(n))
        cache, f._solve_cache = f._solve_cache, None     # no eager solve cache inside a graph
        f.graph_capture = True                            # autocast without its weight cache (make_graphed_callables)
        f.graph_inputs = shared
        sums = shared.saved() if shared else None         # the warm-up backward passes add into them
        # No garbage collection during the capture. Before PyTorch's fix (pytorch/pytorch#195397, 2026-08-31),
        # make_graphed_callables' graphs sit in reference cycles, so the cyclic collector frees dropped ones
        # (an earlier model's, a dropped set's) at an arbitrary allocation; destroying a CUDA graph while another
        # is being captured invalidates that capture. On the H200's torch 2.11 a capture failed so
        # (benchmarks/results/h200-2026-12-04/graphs/check_graphs_synced_weights.txt). Collect first, then hold.
        gc.collect()
        collecting = gc.isenabled()
        gc.disable()
        try:
            s.slots += list(self._make(tuple(evaluate for _ in range(n)), args))
        finally:
            if collecting:
                gc.enable()
            f._solve_cache, f.graph_capture, f.graph_inputs = cache, False, None
            f.nfe, f.nfe_backward = counts                # the captures' warm-up calls are not the solve's
            if shared:
                shared.restore(sums)
        s.owner += [None] * n
        self.captures += 1
