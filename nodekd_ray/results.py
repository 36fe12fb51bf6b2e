"""Result files: written atomically (a temporary file in the same folder, then rename), so a
file appears under its final name only when complete; explicit pyarrow schemas."""
from __future__ import annotations

import json
import os
import tempfile

import pyarrow as pa
import pyarrow.parquet as pq

# ----------------------------------------------------------------------------- attack results
# One declaration of the attack-result columns. Sweeps write one row per (model, attack, eps) into
# results/attacks/dataset=D/attack=A/ (ATTACK_FILE_SCHEMA; ATTACK_SCHEMA adds the two partition columns);
# `nodekd attack` writes one row per (image, eps) (SAMPLE_SCHEMA): the same columns where they mean the same,
# plus the image's own.

_FILE_FIELDS = [
    pa.field("model_key", pa.string()),
    pa.field("kind", pa.string()),             # teacher, node, node_kd
    pa.field("model", pa.string()),            # resnet20 ... resnet110, node
    pa.field("teacher", pa.string()),          # KD students: the teacher ResNet
    pa.field("T", pa.float64()),
    pa.field("lam", pa.float64()),
    pa.field("t1", pa.float64()),              # NODE horizon
    pa.field("logits_mode", pa.string()),
    pa.field("seed", pa.int64()),
    pa.field("eps", pa.float64()),             # pixel units, [0, 1]
    pa.field("eps_255", pa.float64()),
    pa.field("steps", pa.int32()),
    pa.field("n_images", pa.int64()),
    pa.field("n_clean_correct", pa.int64()),
    pa.field("n_adv_correct", pa.int64()),
    pa.field("clean_accuracy", pa.float64()),
    pa.field("robust_accuracy", pa.float64()),
    pa.field("nfe_per_image", pa.float64()),   # ODE evaluations (forward + backward) per image, 0 for ResNets
    pa.field("seconds", pa.float64()),         # wall time of this eps
    pa.field("task_seconds", pa.float64()),    # wall time of the whole task (model load, clean pass, all eps)
    pa.field("chunk", pa.string()),
    pa.field("device", pa.string()),           # what the attack ran on: "cpu", "cuda NVIDIA A10G"
    pa.field("held_gpus", pa.string()),        # GPU ids the scheduler assigned to the task ("" for none)
    pa.field("model_sha256", pa.string()),     # the attacked model file (a retrained model makes these rows stale)
    # from here on: added with the audit (files written before hold nulls)
    pa.field("restarts", pa.int32()),          # random starts (an image is robust only if every start fails)
    pa.field("alpha_255", pa.float64()),       # step size in 1/255 (0 where the attack sets its own: APGD, Square)
    pa.field("solver", pa.string()),           # how the evaluated NODE was integrated ("" for ResNets)
    pa.field("rtol", pa.float64()),
    pa.field("atol", pa.float64()),
    pa.field("time_input", pa.string()),
    pa.field("source", pa.string()),           # transfer: the model the images were made on; pgd-rk4: "rk4 x N"
    pa.field("top_class_fraction", pa.float64()),  # share of the most frequent clean prediction (degenerate models)
    pa.field("num_classes", pa.int64()),
    # how the rows were computed (files written before hold nulls: they ran on the model's training settings)
    pa.field("computation", pa.string()),      # "reference" or "as-trained" (attacks.COMPUTATIONS)
    pa.field("precision", pa.string()),        # as the device ran it: fp32, tf32, bf16
    pa.field("step_control", pa.string()),     # dopri5's: plain, noise-aware ("" for ResNets)
    pa.field("solver_impl", pa.string()),      # torchdiffeq, nodekd ("" for ResNets)
    pa.field("norm_impl", pa.string()),        # torch, triton
    pa.field("cuda_graphs", pa.bool_()),
    pa.field("torch_version", pa.string()),
]
# columns that files written by earlier versions lack (read back as nulls)
_LATER_FIELDS = ("model_sha256", "restarts", "alpha_255", "solver", "rtol", "atol", "time_input", "source",
                 "top_class_fraction", "num_classes", "computation", "precision", "step_control", "solver_impl",
                 "norm_impl", "cuda_graphs", "torch_version")
# What each Parquet file holds; dataset and attack are the hive partition folders.
ATTACK_FILE_SCHEMA = pa.schema(_FILE_FIELDS)
ATTACK_SCHEMA = pa.schema(_FILE_FIELDS + [pa.field("dataset", pa.string()), pa.field("attack", pa.string())])

# One row per (image, epsilon): what `nodekd attack` writes. The per-image columns, then the sweep schema's
# columns that describe how the row was computed.
_SAMPLE_ONLY = [
    pa.field("attack", pa.string()),
    pa.field("eps", pa.float64()),          # in [0, 1] pixel units
    pa.field("eps_255", pa.float64()),      # eps * 255, for reading
    pa.field("steps", pa.int32()),
    pa.field("index", pa.int64()),          # position in the evaluated test set
    pa.field("label", pa.int64()),
    pa.field("clean_correct", pa.bool_()),
    pa.field("adv_correct", pa.bool_()),
    pa.field("nfe", pa.int64()),            # ODE evaluations (forward + backward) spent on its batch
    pa.field("seed", pa.int64()),
]
SAMPLE_COMPUTATION = ("solver", "rtol", "atol", "time_input", "computation", "precision", "step_control",
                      "solver_impl", "norm_impl", "cuda_graphs", "torch_version")
SAMPLE_SCHEMA = pa.schema(_SAMPLE_ONLY + [f for f in _FILE_FIELDS if f.name in SAMPLE_COMPUTATION])


def _atomic(path: str, write) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj, path: str) -> None:
    import torch

    _atomic(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_table(table: pa.Table, path: str) -> None:
    _atomic(path, lambda tmp: pq.write_table(table, tmp))


def atomic_write_json(obj, path: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)

    _atomic(path, write)


def atomic_write_text(text: str, path: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    _atomic(path, write)
