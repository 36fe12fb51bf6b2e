"""The Neural ODE student and its configuration (NODEConfig). It takes pixels in [0, 1]. The ResNet teachers are in
resnet.py, the reference computation and --speed in computation.py, checkpoints in checkpoints.py.

The student (paper, section 3.1: "a 4 layers convolutional neural network with 3x3 kernel
size", 512 channels, dopri5 over [0, t1]). What the paper leaves open, chosen here after
torchdiffeq's ODE-Net example (examples/odenet_mnist.py):
  * stem: conv3x3(3->64) GN ReLU, conv4x4/2(64->128) GN ReLU, conv4x4/2(128->width): 32x32 -> 8x8;
  * dynamics f(t, h): four [GroupNorm -> ReLU -> conv3x3(width (+1 time channel) -> width)],
    then a final GroupNorm, as in torchdiffeq's ODEfunc;
  * time input: by default the extra channel carries t itself ("raw"), as in torchdiffeq's
    ODE-Net (ConcatConv2d). "scaled" (t / t1) and "none" are offered, but with "scaled" the horizon
    is only a reparametrisation: substituting s = t / t1, NODE(t1) is exactly NODE(1) with the
    final GroupNorm's affine multiplied by t1 (tests/test_models.py shows it), so a "scaled"
    NODE(100) can learn nothing that a NODE(1) cannot. With "raw" the dynamics see where in
    [0, t1] they are, and the horizon changes the model class;
  * head: GroupNorm ReLU, global average pool, linear;
  * GroupNorm in groups of 16 channels (32 groups at width 512); He (Kaiming normal, fan_out, ReLU) init for every conv.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import ConfigError, ODESolveError, check_choice  # noqa: F401 -- ODESolveError: raised by solves
from .resnet import RESNET_DEPTHS, Normalize, _he_init

# The speed machinery (nodekd_ray/speed/: nodekd's dopri5, the Triton norms, CUDA graphs) registers itself here,
# as torchdiffeq's solvers sit in its SOLVERS table: this module names those parts and never imports them.
# speed_part() loads the package the first time a setting needs one.
SPEED_PARTS: dict = {}


def register_speed_parts(**parts) -> None:
    """Called by nodekd_ray.speed on import: name -> module (dopri5, fused_norm, cuda_graphs)."""
    SPEED_PARTS.update(parts)


def speed_part(name: str):
    if name not in SPEED_PARTS:
        import importlib

        importlib.import_module(__package__ + ".speed")    # registers every part
    return SPEED_PARTS[name]

ARCHS = tuple(RESNET_DEPTHS) + ("node",)
ADAPTIVE_SOLVERS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
FIXED_SOLVERS = ("euler", "midpoint", "rk4")
SOLVERS = ADAPTIVE_SOLVERS + FIXED_SOLVERS
TIME_INPUTS = ("scaled", "raw", "none")
PRECISIONS = ("fp32", "tf32", "bf16")
SOLVER_IMPLS = ("auto", "torchdiffeq", "nodekd")
NORM_IMPLS = ("torch", "triton")
STEP_CONTROLS = ("auto", "plain", "noise-aware")
GRAPH_INPUTS = ("shared", "per-evaluation")


# ----------------------------------------------------------------------------- Neural ODE


def _gn(c: int) -> nn.GroupNorm:
    """GroupNorm with groups of 16 channels, at most 32 groups: GN(32, 512) at the paper's width.

    torchdiffeq's min(32, C) groups degenerates at small widths (C <= 32) into a per-channel
    norm, after which global average pooling sees a constant: small students then barely learn.
    """
    return nn.GroupNorm(max(1, min(32, c // 16)), c)


class _CountBackward(torch.autograd.Function):
    """Identity whose backward counts one vector-Jacobian product through the ODE function."""

    @staticmethod
    def forward(ctx, x, counter):
        ctx.counter = counter
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        _count_vjp(ctx.counter, grad)
        return grad, None


def _count_vjp(f, grad):
    """One vector-Jacobian product through f (an ODEFunc) begins: count it, and set cuDNN's conv precision."""
    f.nfe_backward += 1
    if grad.is_cuda and f.precision != "bf16":
        # The backward pass runs after forward's scoped setting is gone, so f's conv backward
        # would run at cuDNN's process default (TF32) even for precision "fp32". This is the
        # first step of backpropagating through this evaluation of f: its conv backward ops
        # follow, and run in f's arithmetic. The setting stays until the next evaluation of f
        # (forward or backward) sets it again: a process training an fp32 student runs its
        # stem's backward in IEEE fp32 too.
        torch.backends.cudnn.conv.fp32_precision = "tf32" if f.precision == "tf32" else "ieee"


class _SharedCast(torch.autograd.Function):
    """``low``, a low-precision copy of ``x`` made once per solve, as one evaluation's input: no copy
    forward, and the backward hands the gradient back in x's dtype. Each evaluation's contribution
    is thus summed in x's dtype (fp32), as autocast's per-call casts would sum them; through one
    shared bf16 tensor they would be summed in bf16 (about 6e-3 off, tests/test_models.py)."""

    @staticmethod
    def forward(ctx, x, low):
        ctx.dtype = x.dtype
        return low.view_as(low)

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.dtype), None


class ODEFunc(nn.Module):
    """f(t, h): four GN-ReLU-conv3x3 layers and a final GN. Counts its evaluations.

    ``nfe`` counts forward evaluations (including those the adjoint method makes while
    solving backwards); ``nfe_backward`` counts vector-Jacobian products through f, which is
    the backward cost with either plain backpropagation or the adjoint method.
    """

    def __init__(self, width: int, layers: int = 4, time_input: str = "raw", t1: float = 1.0,
                 time_conv: str = "aligned", precision: str = "tf32",
                 recompute: bool = False, norm_impl: str = "torch"):
        super().__init__()
        self.time_input, self.t1, self.time_conv, self.precision = time_input, t1, time_conv, precision
        self.recompute = recompute
        # torch.compile of f's GroupNorm + ReLU pairs and bf16 norms ("compile", "bf16_norms") were removed on
        # 2026-12-05: both measured slower than their baselines (benchmarks/README.md).
        self._gn_relu = _gn_relu
        self._triton = norm_impl == "triton"   # nodekd_ray/speed/fused_norm.py
        if self._triton:
            self._gn_relu = self._fused.gn_relu
        extra = 0 if time_input == "none" else 1
        self.norms = nn.ModuleList(_gn(width) for _ in range(layers))
        self.convs = nn.ModuleList(nn.Conv2d(width + extra, width, 3, 1, 1) for _ in range(layers))
        self.norm_out = _gn(width)
        self.nfe = 0
        self.nfe_backward = 0
        self.nfe_reference = 0     # evaluations by reference() (step_control "noise-aware": 2 per solve)
        self._solve_cache = None   # dict while a solve runs (see solving())
        self.graph_capture = False  # True while cuda_graphs.GraphedSolves captures f: autocast without its cache
        self.graph_inputs = None    # cuda_graphs.GraphSolveInputs while GraphedSolves captures f with a solve's
                                    # shared inputs (read by fused_norm.fused_layers)

    def forward(self, t, h):  # h: (B, width, 8, 8), fp32: the solver's state and error control stay fp32
        self.nfe += 1
        if self.precision == "bf16":
            with torch.autocast(h.device.type, dtype=torch.bfloat16, cache_enabled=not self.graph_capture):
                z, last = self._layers(t, h)
            z = z if self._fused else z.float()
        elif h.is_cuda:
            with _cudnn_conv_precision("tf32" if self.precision == "tf32" else "ieee"):
                z, last = self._layers(t, h)
        else:
            z, last = self._layers(t, h)
        if self._fused:   # reads bf16 z directly (no cast kernel), adds the last conv's bias and time term, writes fp32
            n = self.norm_out
            last = dict(last or {})
            gamma, beta = last.pop("params", (n.weight, n.bias))
            out = self._fused.group_norm_act(z, n.num_groups, gamma, beta, n.eps, relu=False,
                                             out_dtype=torch.float32, **last)
        else:
            out = self.norm_out(z)
        return _CountBackward.apply(out, self) if torch.is_grad_enabled() else out

    def reference(self, t, h):
        """f(t, h) in h's dtype with PyTorch's own ops and no autocast, the time channel concatenated: the
        yardstick against which step_control "noise-aware" measures the rounding noise of f's own precision
        (nodekd_ray/speed/dopri5.py). No autograd; counted in nfe_reference, not in nfe. On a GPU the convolutions
        are IEEE fp32 for a tf32 f, and TF32 for a bf16 f: TF32's noise is about a tenth of bf16's (f 6e-4
        against 7e-3 off fp64 on an H100, README), so it adds 0.5% to the measured noise, and a TF32
        evaluation costs about what a bf16 one does where IEEE fp32 costs twice that. On a CPU, fp32."""
        self.nfe_reference += 1
        conv_mode = _cudnn_conv_precision("tf32" if self.precision == "bf16" else "ieee") if h.is_cuda \
            else contextlib.nullcontext()
        with torch.no_grad(), torch.autocast(h.device.type, enabled=False), conv_mode:
            if self.time_input != "none":
                tv = t / self.t1 if self.time_input == "scaled" else t
                tt = tv.to(h.dtype).expand(h.shape[0], 1, h.shape[2], h.shape[3])
            for norm, conv in zip(self.norms, self.convs):
                a = _gn_relu(h, norm.num_groups, norm.weight, norm.bias, norm.eps)
                h = F.conv2d(a if self.time_input == "none" else torch.cat([a, tt], dim=1), conv.weight, conv.bias, 1, 1)
            return self.norm_out(h)

    @contextlib.contextmanager
    def solving(self):
        """One solve's evaluations share each conv's prepared weights (see _aligned_weights): the
        weights do not change during a solve, so the slice, the layout and dtype copies and the
        time response are made once per solve instead of once per evaluation; gradients reach
        the parameters through them all the same. Not with the adjoint method, whose backward
        solve evaluates f again and differentiates it with respect to the parameters themselves."""
        self._solve_cache = {}
        try:
            yield
        finally:
            self._solve_cache = None

    def _layers(self, t, h):
        """(the last conv's output, what the final norm still has to do): None, or with the fused norms
        (norm_impl "triton" with the aligned time conv, not recompute) the group_norm_act arguments that add
        the last conv's bias and time term, and the final norm's parameters ("params")."""
        if self.time_input != "none":
            tv = t / self.t1 if self.time_input == "scaled" else t
            tt = tv.to(h.dtype).expand(h.shape[0], 1, h.shape[2], h.shape[3])
        recompute = self.recompute and torch.is_grad_enabled()
        if self._fused and not recompute and self.time_input != "none" and self.time_conv == "aligned":
            # f's fused path: the Triton norms add each conv's bias and time term, and sum their parameters'
            # gradients over a solve (nodekd_ray/speed/fused_norm.py, fused_layers)
            return self._fused.fused_layers(self, h, tv)
        for i, (norm, conv) in enumerate(zip(self.norms, self.convs)):
            gn = (norm.num_groups, norm.weight, norm.bias, norm.eps)
            if recompute:   # time_conv "aligned" or time_input "none" (NODEConfig.validate)
                w, response = (conv.weight, None) if self.time_input == "none" else self._aligned_weights(i, conv, h)
                h = _NormReluConv.apply(h, norm.weight, norm.bias, w, conv.bias, norm.num_groups, norm.eps,
                                        self._gn_relu)
                if response is not None:
                    h = h + tv.to(h.dtype) * response
            elif self.time_input == "none":
                h = _layer(h, gn, conv.weight, conv.bias, None, None, None, self._gn_relu)
            elif self.time_conv == "concat":
                h = _layer(h, gn, conv.weight, conv.bias, tt, None, None, self._gn_relu)
            else:
                w, response = self._aligned_weights(i, conv, h)
                h = _layer(h, gn, w, conv.bias, None, tv, response, self._gn_relu)
        return h, None

    @property
    def _fused(self):
        """nodekd_ray.speed.fused_norm with norm_impl "triton", else None (a property: a module in the instance's
        attributes would stop deepcopy and pickle, e.g. attacks.with_solver's copy)."""
        return speed_part("fused_norm") if self._triton else None

    def _aligned_weights(self, i: int, conv: nn.Conv2d, h: torch.Tensor, low_response: bool = True):
        """The time channel without breaking alignment: conv(cat([h, t * 1])) is conv over h's width
        channels (a shape GPU matrix units handle well: 512 -> 512, not 513 -> 512) plus t times the
        kernel's response to a constant channel of ones. The response is computed with the same
        zero padding, so border pixels, which see fewer ones, are exact too. By linearity this is the
        concatenation form (tests/test_models.py compares them). The weight keeps its (width,
        width + 1, 3, 3) shape, so checkpoints are the same either way.

        Returns conv's weight over h's channels (contiguous, in h's memory format and in the dtype
        the conv runs in) and the response; cached for the solve in progress (solving()). Under
        autocast the low-precision copies are made once per solve, but each evaluation reaches them
        through _SharedCast, so that a solve's gradient contributions are summed in the weight's
        dtype (fp32), as autocast's per-call casts would sum them, not in bf16. low_response False returns
        the fp32 response even under autocast (the fused norms add it in fp32)."""
        key = (i, h.shape[2], h.shape[3], torch.get_autocast_dtype(h.device.type)
               if torch.is_autocast_enabled(h.device.type) else h.dtype, torch.is_grad_enabled())
        cache = self._solve_cache
        if cache is not None and key in cache:
            prepared = cache[key]
        else:
            c = h.shape[1]
            w = conv.weight
            fmt = torch.channels_last if h.is_contiguous(memory_format=torch.channels_last) and c > 1 \
                else torch.contiguous_format
            main = w[:, :c].contiguous(memory_format=fmt)
            ones = torch.ones(1, 1, h.shape[2], h.shape[3], dtype=w.dtype, device=h.device)
            with torch.autocast(h.device.type, enabled=False):
                response = F.conv2d(ones, w[:, c:], None, conv.stride, conv.padding)   # (1, width, H, W)
            prepared = (main, response)
            if key[3] != w.dtype:   # autocast: the copies the convs run on, made once
                prepared += tuple(t.detach().to(key[3]) for t in prepared)
            if cache is not None:
                cache[key] = prepared
        if len(prepared) == 2:
            return prepared
        main, response, main_low, response_low = prepared
        if not torch.is_grad_enabled():
            return main_low, response_low if low_response else response
        return (_SharedCast.apply(main, main_low),
                _SharedCast.apply(response, response_low) if low_response else response)


def _gn_relu(h, groups: int, gamma, beta, eps: float):
    return F.relu(F.group_norm(h, groups, gamma, beta, eps))


def _layer(h, gn, w, bias, tt, tv, response, gn_relu=_gn_relu):
    """One layer of f: conv3x3(relu(groupnorm(h))), the time channel concatenated (tt) or added as
    t times the conv's response to it (tv, response; see ODEFunc._aligned_weights)."""
    h = gn_relu(h, *gn)
    if tt is not None:
        h = torch.cat([h, tt], dim=1)
    out = F.conv2d(h, w, bias, 1, 1)
    return out if response is None else out + tv.to(h.dtype) * response


class _NormReluConv(torch.autograd.Function):
    """conv3x3(relu(groupnorm(h))) that keeps only h for the backward pass (``recompute``).

    Plain autograd keeps two states per layer: GroupNorm's input and the ReLU's output, which the
    conv needs for its weight gradient. Here the backward recomputes GroupNorm + ReLU from h (one
    memory-bound pass; the conv is not recomputed) and then runs the conv's backward and
    GroupNorm's, so a layer keeps one state instead of two: f keeps 5 states per evaluation instead
    of 9. The ops and dtypes are plain autograd's, autocast included (the forward runs under the
    caller's autocast; the backward restores it for the recomputation and runs the conv's backward
    in the dtype the conv ran in), so gradients are the same (tests/test_models.py)."""

    @staticmethod
    def forward(ctx, h, gamma, beta, w, bias, groups: int, eps: float, gn_relu=_gn_relu):
        device = h.device.type
        ctx.autocast = torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)
        ctx.groups, ctx.eps, ctx.gn_relu = groups, eps, gn_relu
        ctx.save_for_backward(h, gamma, beta, w, bias)
        return F.conv2d(gn_relu(h, groups, gamma, beta, eps), w, bias, 1, 1)

    @staticmethod
    def backward(ctx, g):
        h, gamma, beta, w, bias = ctx.saved_tensors
        need_h, need_gamma, need_beta, need_w, need_bias = ctx.needs_input_grad[:5]
        enabled, low = ctx.autocast
        with torch.enable_grad(), torch.autocast(h.device.type, dtype=low, enabled=enabled):
            leaves = [t.detach().requires_grad_(need) for t, need in ((h, need_h), (gamma, need_gamma), (beta, need_beta))]
            a = ctx.gn_relu(leaves[0], ctx.groups, leaves[1], leaves[2], ctx.eps)
        cd = low if enabled else a.dtype          # the dtype autocast ran the conv in: inputs, weight and bias
        ga, gw, gb = torch.ops.aten.convolution_backward(
            g.to(cd), a.detach().to(cd), w.to(cd), None if bias is None else [bias.shape[0]], [1, 1], [1, 1], [1, 1],
            False, [0, 0], 1, [need_h or need_gamma or need_beta, need_w, bias is not None and need_bias])
        wanted = [t for t in leaves if t.requires_grad]
        grads = iter(torch.autograd.grad(a, wanted, ga.to(a.dtype)) if wanted else ())
        gh, ggamma, gbeta = (next(grads) if t.requires_grad else None for t in leaves)
        return (gh, ggamma, gbeta, None if gw is None else gw.to(w.dtype),
                None if gb is None else gb.to(bias.dtype), None, None, None)


@contextlib.contextmanager
def _cudnn_conv_precision(mode: str):
    """cuDNN convolutions in fp32 run as TF32 by default in PyTorch (torch.backends.cudnn.conv.
    fp32_precision == "tf32"); precision "fp32" asks for IEEE fp32 ("ieee") instead."""
    conv = torch.backends.cudnn.conv
    before = conv.fp32_precision
    conv.fp32_precision = mode
    try:
        yield
    finally:
        conv.fp32_precision = before


@dataclass
class NODEConfig:
    # The fields the command lines show carry their help here (metadata "help"): nodekd train-student's "Neural
    # ODE" options are generated from them (config_cli.py), so the flag, its default and its help are written once.
    width: int = field(default=512, metadata={"help": "channels of the ODE state and of every conv in f (paper: 512)"})
    layers: int = field(default=4, metadata={"help": "3x3 conv layers in f (paper: 4)"})
    stem_channels: int = field(default=64, metadata={"help": "channels of the first stem conv (torchdiffeq's ODE-Net: "
                                                             "64)"})
    t1: float = field(default=1.0, metadata={"help": "horizon [0, t1], > 0 (paper: 1 and 100; 500 in Table 3)"})
    solver: str = field(default="dopri5", metadata={"help": "torchdiffeq method (paper: dopri5)",
                                                    "choices": SOLVERS})
    rtol: float = field(default=1e-3, metadata={"help": "relative tolerance (NODE papers use 1e-3; torchdiffeq's "
                                                        "default 1e-7 is far tighter)"})
    atol: float = field(default=1e-3, metadata={"help": "absolute tolerance"})
    max_num_steps: int = field(default=10_000, metadata={"help": "accepted + rejected step limit per solve "
                                                                 "(adaptive solvers)"})
    step_size: float = field(default=0.0, metadata={"help": "step of fixed-step solvers; 0 means t1 / 10"})
    adjoint: bool = field(default=False, metadata={"help": "backpropagate with odeint_adjoint: O(1) memory in time, "
                                                           "re-solves backwards"})
    time_input: str = field(default="raw", metadata={"help": "time channel of f: raw (t itself, torchdiffeq's "
                                                             "ODE-Net), scaled (t / t1) or none",
                                                     "choices": TIME_INPUTS})
    time_conv: str = "aligned"    # how the time channel enters a conv: "aligned" (width -> width conv plus
                                  # t times a precomputed response) or "concat" (width + 1 -> width); equal
    precision: str = "tf32"       # convolutions of f: "fp32" (IEEE), "tf32" (PyTorch's default for cuDNN
                                  # convs on GPUs) or "bf16" (autocast); state, solver and loss stay fp32
    channels_last: bool = False   # NHWC memory format for the ODE state and f's convolutions
    # f's backward recomputes each GroupNorm + ReLU instead of keeping its output: 5 states kept per evaluation
    # instead of 9, for one more GroupNorm pass per layer in the backward (time_conv "aligned" only)
    recompute: bool = field(default=False, metadata={"help": "recompute f's GroupNorm + ReLU in the backward: about "
                                                             "half the activation memory per NFE"})
    norm_impl: str = "torch"      # f's GroupNorm (+ ReLU): "torch" (PyTorch's ops) or "triton" (nodekd_ray/
                                  # fused_norm.py: one kernel each way, fp32 statistics, output written in the
                                  # next conv's dtype; CUDA only). The default stays torch's: on an H200 the
                                  # kernels were faster in some training configurations and slower in others,
                                  # and slower per call eagerly; with cuda_graphs they pay (README)
    solver_impl: str = "auto"     # "torchdiffeq", "nodekd" (nodekd_ray/speed/dopri5.py: torchdiffeq's dopri5 steps with
                                  # fewer device operations; dopri5 with plain backpropagation only), or "auto":
                                  # nodekd where it applies, else torchdiffeq (solver_impl_used). Measured on an
                                  # H200 (README, "Measured on one H200"): a width-512 training step 1.19x faster
                                  # at tf32, 1.36x at bf16, the same NFE and logits as far from fp64
    step_control: str = "auto"    # "plain" (torchdiffeq's), "noise-aware" (solver_impl "nodekd", precision tf32
                                  # or bf16): dopri5 measures f's rounding noise against an fp32 evaluation (2 per
                                  # solve) and takes it out of each step's error ratio, so that bf16/TF32 noise does
                                  # not shrink the steps (nodekd_ray/speed/dopri5.py), or "auto": noise-aware on a GPU
                                  # where it applies, else plain (step_control_used). On a CPU tf32 is IEEE fp32,
                                  # f has no such noise, and the 2 fp32 evaluations would buy nothing. Measured on
                                  # an H200: 14 / 13 NFE per training step against 20 / 19 (fp32's 14 / 13),
                                  # 1.20x the images/s at tf32 and 1.37x at bf16, state errors against fp64 the same
    cuda_graphs: bool = False     # a training solve's evaluations of f (with autograd) replayed from CUDA graphs, one
                                  # graph pair per evaluation slot (nodekd_ray/speed/cuda_graphs.py); nodekd's dopri5 only;
                                  # on a CPU, and for evaluations without autograd, f runs eagerly. Off by default:
                                  # at the default precision and norms it gains nothing on an H200 (README, "CUDA
                                  # graphs"); with bf16 and norm_impl "triton" it is the fastest path measured
    graph_inputs: str = "shared"  # with cuda_graphs, what f's graphs take: "shared", a solve's shared inputs (its
                                  # prepared weights in, one gradient sum per solve out; GraphSolveInputs) where f's
                                  # fused path allows (norm_impl "triton", time_conv "aligned", NCHW), else the
                                  # parameters per evaluation, or "per-evaluation" always. Measured on an H200 at
                                  # bf16: f at 44.6-45.1% MFU against 37.3-38.0%, 4200-4351 against 3582-3983 img/s
                                  # (README, "A solve's shared inputs in the graphs")

    def solver_impl_used(self) -> str:
        """The dopri5 implementation a solve runs: solver_impl, with "auto" resolved."""
        if self.solver_impl != "auto":
            return self.solver_impl
        return "nodekd" if self.solver == "dopri5" and not self.adjoint else "torchdiffeq"

    def step_control_used(self, cuda: bool) -> str:
        """The step control a solve on a GPU (cuda True) or a CPU runs: step_control, with "auto" resolved."""
        if self.step_control != "auto":
            return self.step_control
        return "noise-aware" if cuda and self.solver_impl_used() == "nodekd" and self.precision != "fp32" else "plain"

    def validate(self) -> "NODEConfig":
        check_choice("solver", self.solver, SOLVERS)
        check_choice("time_input", self.time_input, TIME_INPUTS)
        check_choice("time_conv", self.time_conv, ("aligned", "concat"))
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("solver_impl", self.solver_impl, SOLVER_IMPLS)
        if self.recompute and self.time_conv == "concat" and self.time_input != "none":
            raise ConfigError("recompute", f"needs time_conv 'aligned', got time_conv {self.time_conv!r}")
        check_choice("norm_impl", self.norm_impl, NORM_IMPLS)
        if self.norm_impl == "triton":
            if not speed_part("fused_norm").available():
                raise ConfigError("norm_impl", "'triton' needs the triton package (installed with CUDA builds of torch)")
        check_choice("step_control", self.step_control, STEP_CONTROLS)
        if self.step_control == "noise-aware" and (self.solver_impl_used() != "nodekd" or self.precision == "fp32"):
            raise ConfigError("step_control", "'noise-aware' needs solver_impl 'nodekd' and precision tf32 or bf16, got "
                                              f"solver_impl {self.solver_impl_used()!r} and precision {self.precision!r}")
        if self.solver_impl == "nodekd" and (self.solver != "dopri5" or self.adjoint):
            raise ConfigError("solver_impl", "'nodekd' implements dopri5 with plain backpropagation only, got "
                                             f"solver {self.solver!r}{' with the adjoint method' if self.adjoint else ''}")
        if self.cuda_graphs and self.solver_impl_used() != "nodekd":
            raise ConfigError("cuda_graphs", "needs the nodekd solver (dopri5 with plain backpropagation), "
                                             f"got solver_impl {self.solver_impl_used()!r}")
        check_choice("graph_inputs", self.graph_inputs, GRAPH_INPUTS)
        for name in ("t1", "rtol", "atol"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                raise ConfigError(name, f"must be a finite number > 0, got {v}")
        for name in ("width", "layers", "stem_channels", "max_num_steps"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(name, f"must be an integer >= 1, got {getattr(self, name)}")
        if not (self.step_size >= 0 and math.isfinite(self.step_size)):
            raise ConfigError("step_size", f"must be a finite number >= 0, got {self.step_size}")
        return self


class NeuralODE(nn.Module):
    """stem -> ODE block over [0, t1] -> head. ``nfe_forward``/``nfe_backward`` are totals."""

    def __init__(self, cfg: NODEConfig, num_classes: int = 10, mean=(0.5,) * 3, std=(0.25,) * 3, in_channels: int = 3):
        super().__init__()
        self.cfg = cfg.validate()
        w, s = cfg.width, cfg.stem_channels
        self.normalize = Normalize(mean, std)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, s, 3, 1, 1), _gn(s), nn.ReLU(inplace=True),
            nn.Conv2d(s, 2 * s, 4, 2, 1), _gn(2 * s), nn.ReLU(inplace=True),
            nn.Conv2d(2 * s, w, 4, 2, 1),
        )
        self.func = ODEFunc(w, cfg.layers, cfg.time_input, cfg.t1, cfg.time_conv, cfg.precision,
                            cfg.recompute, cfg.norm_impl)
        self.head_norm = _gn(w)
        self.fc = nn.Linear(w, num_classes)
        self.register_buffer("t_span", torch.tensor([0.0, float(cfg.t1)]), persistent=False)
        self._t_end = float(self.t_span[1])     # t1 as torchdiffeq sees it (through t_span), on the host
        self._graphs = None                     # cuda_graphs.GraphedSolves, made at the first solve with cuda_graphs
        _he_init(self)
        if cfg.channels_last:   # after the init: normal_ fills storage in memory order
            self.func.to(memory_format=torch.channels_last)

    @property
    def nfe_forward(self) -> int:
        return self.func.nfe

    @property
    def nfe_backward(self) -> int:
        return self.func.nfe_backward

    def integrate(self, h0):
        from torchdiffeq import odeint, odeint_adjoint

        cfg = self.cfg
        if cfg.solver in FIXED_SOLVERS:
            options = {"step_size": cfg.step_size or cfg.t1 / 10}
        else:
            options = {"max_num_steps": cfg.max_num_steps}
        solve = odeint_adjoint if cfg.adjoint else odeint
        kwargs = dict(adjoint_params=tuple(self.func.parameters())) if cfg.adjoint else {}
        graphed = None
        if cfg.cuda_graphs:
            if self._graphs is None:
                self._graphs = speed_part("cuda_graphs").GraphedSolves(self.func, share_inputs=cfg.graph_inputs == "shared")
            graphed, h0 = self._graphs.begin(h0)
        shared = contextlib.nullcontext() if cfg.adjoint or graphed else self.func.solving()
        try:
            with shared:
                if cfg.solver_impl_used() == "nodekd":
                    noise_aware = cfg.step_control_used(h0.is_cuda) == "noise-aware"
                    h = speed_part("dopri5").dopri5(graphed or self.func, h0, 0.0, self._t_end, rtol=cfg.rtol, atol=cfg.atol,
                               max_num_steps=cfg.max_num_steps,
                               reference=self.func.reference if noise_aware else None)
                else:
                    h = solve(self.func, h0, self.t_span, rtol=cfg.rtol, atol=cfg.atol,
                              method=cfg.solver, options=options, **kwargs)[-1]
        except (AssertionError, ODESolveError) as e:  # torchdiffeq signals underflow / step limit by assert
            raise ODESolveError(f"{cfg.solver} failed over [0, {cfg.t1:g}]: {e}") from None
        if not torch.isfinite(h).all():
            raise ODESolveError(f"{cfg.solver} produced a non-finite state over [0, {cfg.t1:g}]")
        return h

    def forward(self, x):  # x: (B, C, 32, 32) in [0, 1]
        if x.is_cuda and self.cfg.precision != "bf16":   # the stem's and head's convs in the same arithmetic as f's
            with _cudnn_conv_precision("tf32" if self.cfg.precision == "tf32" else "ieee"):
                return self._forward(x)
        return self._forward(x)

    def _forward(self, x):
        h = self.stem(self.normalize(x))          # (B, width, 8, 8)
        if self.cfg.channels_last:
            h = h.contiguous(memory_format=torch.channels_last)
        h = self.integrate(h)                     # (B, width, 8, 8)
        h = F.relu(self.head_norm(h)).mean(dim=(2, 3))  # (B, width)
        return self.fc(h)                         # (B, classes)
