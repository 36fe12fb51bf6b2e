"""The computations a Neural ODE can run: the reference computation every measurement runs on (as_reference,
with_computation, computation_info, reference_arithmetic), and the one speed switch (--speed: speed_settings)
resolved to NODEConfig's fine settings, here and nowhere else."""
from __future__ import annotations

import contextlib
from dataclasses import replace

import torch
import torch.nn as nn

from .errors import ConfigError, check_choice
from .models import NeuralODE, NODEConfig

# ----------------------------------------------------------------------------- the reference computation

# What every measurement (clean accuracy in attack rows, every attack and audit attack) runs on unless the
# user asks to evaluate as trained: the paper's fp32 dopri5 through torchdiffeq with its plain step control,
# IEEE fp32 convolutions, PyTorch's norms, no graphs. The speed settings are for training.
REFERENCE_COMPUTATION = dict(precision="fp32", solver_impl="torchdiffeq", step_control="plain", norm_impl="torch",
                             cuda_graphs=False, recompute=False, channels_last=False)


# The one speed switch (--speed): each name resolved to NODEConfig's fine settings here and nowhere else. The fine
# settings stay NODEConfig fields for experts (the Python API, or --node FIELD=VALUE on the command lines).
#   reference  the reference computation itself: the paper's fp32 dopri5 through torchdiffeq
#   default    NODEConfig's defaults: TF32 convs (PyTorch's own default on GPUs), nodekd's dopri5, and on a GPU
#              noise-aware step control
#   fastest    the fastest path measured: bf16 autocast, nodekd's dopri5, noise-aware control, and on a GPU the
#              Triton norms and CUDA graphs (README, "Speed"); evidence on whether it changes the answer:
#              docs/computation-study.md
SPEEDS = ("reference", "default", "fastest")
_SPEED_FIELDS = {
    "reference": {k: REFERENCE_COMPUTATION[k] for k in ("precision", "solver_impl", "step_control", "norm_impl",
                                                         "cuda_graphs")},   # recompute: a memory option, apart
    "default": {},
    "fastest": dict(precision="bf16", solver_impl="nodekd", step_control="noise-aware", norm_impl="triton",
                    cuda_graphs=True),
}
SPEED_HELP = ("how students train (default: default): reference (the paper's fp32 dopri5 through torchdiffeq), default "
              "(TF32 convs, nodekd's dopri5, noise-aware step control on a GPU) or fastest (bf16, nodekd's dopri5, "
              "noise-aware control, on a GPU the Triton norms and CUDA graphs; 6.1x the fp32 images/s on an H200). "
              "fastest changed the answer on a CPU: KD students trained in bf16 lost 5.2 +- 5.1 points of robust "
              "accuracy at 8/255 (5 seeds; docs/computation-study.md). Evaluation runs on the reference "
              "computation whatever is chosen here")
_GPU_ONLY_FIELDS = {"norm_impl": "torch", "cuda_graphs": False}   # what a CPU runs instead


def speed_settings(speed: str, device_type: str = "cuda") -> dict:
    """NODEConfig fields of a --speed name on a device of this type ("cuda" or "cpu")."""
    check_choice("speed", speed, SPEEDS)
    fields = dict(_SPEED_FIELDS[speed])
    if device_type != "cuda" and fields:
        fields.update(_GPU_ONLY_FIELDS)
    return fields


def parse_node_overrides(items) -> dict:
    """--node FIELD=VALUE items -> NODEConfig fields, each value converted to its field's type. One-line
    ConfigError for an unknown field or a value of the wrong type."""
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(NODEConfig)}
    out = {}
    for item in items or ():
        name, sep, text = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep:
            raise ConfigError("node", f"expected FIELD=VALUE, got {item!r}")
        if name not in fields:
            raise ConfigError("node", f"unknown field {name!r}; allowed: {', '.join(fields)}")
        kind = type(getattr(NODEConfig(), name))
        try:
            if kind is bool:
                if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(text)
                value = text.lower() in ("true", "1", "yes")
            else:
                value = kind(text)
        except ValueError:
            raise ConfigError(f"node.{name}", f"must be a {kind.__name__}, got {text!r}") from None
        out[name] = value
    return out


def as_reference(model: nn.Module) -> nn.Module:
    """``model`` on the reference computation: a Neural ODE trained with speed settings is rebuilt with
    REFERENCE_COMPUTATION and the same weights (f's precision and norms are fixed when it is built, so a
    changed cfg alone would not do); a model already there, or a ResNet, is returned as it is."""
    return with_computation(model, **REFERENCE_COMPUTATION)


def with_computation(model: nn.Module, **fields) -> nn.Module:
    """A Neural ODE with the same weights computing with other NODEConfig settings (precision, solver_impl,
    step_control, norm_impl, cuda_graphs, ...): rebuilt, not changed in place. ``model`` itself is returned when
    nothing changes, and a ResNet always (it has no such settings)."""
    cfg = getattr(model, "cfg", None)
    if cfg is None or all(getattr(cfg, k) == v for k, v in fields.items()):
        return model
    out = NeuralODE(replace(cfg, **fields), model.fc.out_features, in_channels=model.stem[0].in_channels)
    out.load_state_dict(model.state_dict())
    param = next(model.parameters())
    return out.to(param.device).train(model.training)


def computation_info(model: nn.Module, device) -> dict:
    """How ``model`` computes on ``device``, for result rows: precision as the device runs it (TF32 is
    IEEE fp32 on a CPU), step control and dopri5 implementation as resolved, norms, CUDA graphs, torch."""
    cuda = torch.device(device).type == "cuda"
    cfg = getattr(model, "cfg", None)
    if cfg is None:   # a ResNet: PyTorch's default arithmetic unless run inside reference_arithmetic
        precision = "tf32" if cuda and torch.backends.cudnn.conv.fp32_precision != "ieee" else "fp32"
        return {"precision": precision, "step_control": "", "solver_impl": "", "norm_impl": "torch",
                "cuda_graphs": False, "torch_version": torch.__version__}
    precision = "fp32" if cfg.precision == "tf32" and not cuda else cfg.precision
    return {"precision": precision, "step_control": cfg.step_control_used(cuda), "solver_impl": cfg.solver_impl_used(),
            "norm_impl": cfg.norm_impl, "cuda_graphs": bool(cfg.cuda_graphs and cuda),
            "torch_version": torch.__version__}


@contextlib.contextmanager
def reference_arithmetic():
    """IEEE fp32 for every cuDNN convolution and CUDA matmul inside (PyTorch's default for convs is TF32):
    a ResNet evaluated on the reference computation."""
    conv, mm = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = conv.fp32_precision, mm.fp32_precision
    conv.fp32_precision, mm.fp32_precision = "ieee", "ieee"
    try:
        yield
    finally:
        conv.fp32_precision, mm.fp32_precision = before
