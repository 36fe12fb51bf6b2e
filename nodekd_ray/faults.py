"""Fault injection, for the fault-tolerance tests only: every injected failure in one place.

$NODEKD_FAULTS holds JSON, name -> {"key": substring, ...}; the driver forwards it to every Ray worker.
Faults (and where they fire):
  raise_in_training   sweep.run_training, after the epoch given by "epoch": the trial raises InjectedFault
  ode_nan             sweep.run_training, after "epoch": the model's weights become NaN (the ODE solve fails)
  fail_logits         sweep.logit_table: the teacher's logits task raises InjectedFault
  kill_attack_write   sweep.run_attack: the process dies with half a Parquet file under a temporary name
  disk_full           storage.Storage: every write to a path containing "key" fails with ENOSPC while set
Each fault but disk_full fires once per storage folder (a marker file records it), so the retry that follows
runs normally.
"""
from __future__ import annotations

import errno
import json
import os

ENV = "NODEKD_FAULTS"


class InjectedFault(RuntimeError):
    pass


def fault(name: str, key: str, storage, **match) -> bool:
    """True once for an injected fault named in $NODEKD_FAULTS whose "key" is in ``key`` and whose other fields
    equal ``match``'s (e.g. epoch=3)."""
    spec = json.loads(os.environ.get(ENV, "{}")).get(name)
    if not spec or spec.get("key", "") not in key or any(spec.get(k, v) != v for k, v in match.items()):
        return False
    marker = storage.path("faults", f"{name}-{key}")
    if storage.exists(marker):   # one trial per key, so no two processes race for a marker
        return False
    storage.write_bytes(marker, b"")
    return True


def die_mid_write(storage, data: bytes, out: str) -> None:
    """kill_attack_write: the process dies with half a file written under a temporary name."""
    with storage.fs.open_output_stream(storage.temporary(out)) as f:
        f.write(data[: len(data) // 2])
    os._exit(17)


def disk_full(path: str) -> None:
    """disk_full: raises OSError(ENOSPC) for a path containing the fault's key, for as long as it is set."""
    spec = os.environ.get(ENV)
    if spec and "disk_full" in spec:
        key = json.loads(spec).get("disk_full", {}).get("key")
        if key and key in path.replace(os.sep, "/"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
