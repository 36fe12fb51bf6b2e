"""Which device a job computes on, decided from what its scheduler assigned to it (no Ray here).

A job that holds GPUs computes on CUDA; a job that holds none computes on the CPU, even where a
GPU is visible (Ray 2.60 no longer hides unassigned GPUs from a task, so "cuda when available"
would put several 0-GPU jobs on one GPU that nothing scheduled). A job that holds a GPU but cannot
use it fails with one line instead of training on the CPU for days.

For tests on machines without a GPU, NODEKD_LOGICAL_GPUS=1 keeps the scheduler's GPU requests (a
simulated cluster's GPUs are logical) but computes on the CPU; records still show what was held.
"""
from __future__ import annotations

import os

from .errors import ConfigError

LOGICAL_GPUS_ENV = "NODEKD_LOGICAL_GPUS"


def placement_device(gpu_ids) -> str:
    """'cuda' for a job that holds GPUs (the scheduler's CUDA_VISIBLE_DEVICES makes them cuda:0..),
    else 'cpu'. Raises ConfigError("device", ...) when GPUs are held but torch cannot use CUDA."""
    import torch

    if not gpu_ids or os.environ.get(LOGICAL_GPUS_ENV) == "1":
        return "cpu"
    if not torch.cuda.is_available():
        raise ConfigError("device", f"this job holds GPU {list(gpu_ids)} but torch {torch.__version__} "
                                    f"(CUDA {torch.version.cuda}) sees no CUDA device (CUDA_VISIBLE_DEVICES="
                                    f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}; check the driver); "
                                    "--gpus-per-trial 0 runs on CPUs")
    return "cuda"


def describe_device(device) -> str:
    """What a job actually computed on, for records and Parquet rows: 'cpu' or 'cuda NVIDIA A10G'."""
    import torch

    d = torch.device(device)
    if d.type == "cuda":
        return f"cuda {torch.cuda.get_device_name(d)}"
    return d.type
