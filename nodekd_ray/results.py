"""Result files: written atomically (a temporary file in the same folder, then rename), so a
file appears under its final name only when complete; explicit pyarrow schemas."""
from __future__ import annotations

import json
import os
import tempfile

import pyarrow as pa
import pyarrow.parquet as pq

# One row per (image, epsilon): what `nodekd attack` writes.
SAMPLE_SCHEMA = pa.schema([
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
])


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
