"""Models by name (build_model) and their checkpoints: saved with their architecture, normalization and
NODEConfig, loaded with the architecture checked (load_checkpoint)."""
from __future__ import annotations

from dataclasses import asdict

import torch
import torch.nn as nn

from .errors import ConfigError, check_choice
from .models import ARCHS, NeuralODE, NODEConfig
from .resnet import RESNET_DEPTHS, CifarResNet

# ----------------------------------------------------------------------------- registry


# Fields of NODEConfig removed since checkpoints were first written: dropped when an older checkpoint is loaded.
# compile and bf16_norms went on 2026-12-05 (both measured slower than their baselines); they changed how f ran,
# never its weights, and both defaulted to off.
REMOVED_NODE_FIELDS = ("compile", "bf16_norms")


def _known_node_fields(node: dict) -> dict:
    return {k: v for k, v in node.items() if k not in REMOVED_NODE_FIELDS}


def build_model(arch: str, *, num_classes: int = 10, mean=(0.5,) * 3, std=(0.25,) * 3, node: dict | None = None) -> nn.Module:
    """Name -> model. ``node`` holds NODEConfig fields for arch == "node"."""
    check_choice("model", arch, ARCHS)
    if arch == "node":
        return NeuralODE(NODEConfig(**_known_node_fields(node or {})), num_classes, mean, std)
    return CifarResNet(RESNET_DEPTHS[arch], num_classes, mean, std)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def nfe_totals(model: nn.Module) -> tuple[int, int]:
    """(forward, backward) function evaluations so far; (0, 0) for models without an ODE."""
    return (getattr(model, "nfe_forward", 0), getattr(model, "nfe_backward", 0))


def save_checkpoint(path: str, model: nn.Module, **ckpt) -> None:
    """Writes a weights_only-loadable dict atomically (a temporary file, then rename)."""
    from .results import atomic_torch_save

    atomic_torch_save(checkpoint_state(model, **ckpt), path)


def checkpoint_state(model: nn.Module, *, arch: str, num_classes: int, mean, std,
                     node: dict | None = None, meta: dict | None = None) -> dict:
    """What a checkpoint file holds: plain types and CPU tensors (loadable with weights_only)."""
    return {
        "format": "nodekd-checkpoint-v1",
        "arch": arch,
        "num_classes": int(num_classes),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "node": dict(node or {}),
        "meta": dict(meta or {}),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }


def load_checkpoint(path, *, expect_arch: str | tuple[str, ...] | None = None, map_location="cpu",
                    name: str | None = None):
    """Returns (model in eval mode, checkpoint dict). Bad files and wrong architectures raise ConfigError.

    path: a file path, or a binary file object (then ``name`` says what it is in error messages).
    """
    import os

    if isinstance(path, (str, os.PathLike)):
        if not os.path.isfile(path):
            raise ConfigError("checkpoint", f"no such file: {path}")
        name = name or os.fspath(path)
    source, path = path, name or "checkpoint"
    try:
        ckpt = torch.load(source, map_location=map_location, weights_only=True)
    except Exception as e:
        why = str(e).strip().splitlines()[0][:200] if str(e).strip() else "empty or truncated file"
        raise ConfigError("checkpoint", f"cannot read {path}: {type(e).__name__}: {why}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != "nodekd-checkpoint-v1":
        raise ConfigError("checkpoint", f"{path} is not a nodekd checkpoint")
    missing = [k for k in ("arch", "num_classes", "mean", "std", "node", "state_dict") if k not in ckpt]
    if missing:
        raise ConfigError("checkpoint", f"{path} is damaged: it lacks {', '.join(missing)}")
    arch = ckpt["arch"]
    if expect_arch is not None:
        allowed = (expect_arch,) if isinstance(expect_arch, str) else tuple(expect_arch)
        if arch not in allowed:
            raise ConfigError("checkpoint", f"{path} holds a {arch!r} model; expected {' or '.join(allowed)}")
    try:
        model = build_model(arch, num_classes=ckpt["num_classes"], mean=ckpt["mean"], std=ckpt["std"],
                            node=ckpt["node"] or None)
    except (ConfigError, TypeError, ValueError) as e:
        raise ConfigError("checkpoint", f"{path} is damaged: cannot build its {arch!r} model: "
                                        f"{str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from None
    try:
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, TypeError, AttributeError) as e:
        raise ConfigError("checkpoint", f"{path}: weights do not fit a {arch!r} model: "
                                        f"{str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from None
    return model.eval(), ckpt


def node_config_dict(cfg: NODEConfig) -> dict:
    return asdict(cfg)
