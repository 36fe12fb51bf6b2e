"""What a sweep will cost in GPU-hours, from measured figures (plain Python; no Ray, no torch).

A costs file (JSON) holds what was measured on one kind of GPU; every part is optional:

    {"device": "cuda NVIDIA H100 80GB HBM3",
     "rates": {"student": 210.0, "teacher": 35.0},     # achieved training TFLOP/s
     "nfe_forward": {"1": 26, "100": 58},             # dopri5 forward NFE per solve, by t1
     "seconds_per_epoch": {"student-cifar10-node100-...": 41.0}}   # by job key

``benchmarks/bench_student.py --out FILE`` writes the device and the rates (the student's at
the default precision, tf32, with nodekd's dopri5 where that row was run, and a ResNet20's); ``nodekd costs STORAGE --out FILE`` writes the
seconds per epoch and forward NFE that a finished (pilot) sweep's records hold. Two files merge
with ``--costs A B``, later ones winning.

A job's GPU-seconds: epochs x its measured seconds per epoch where the file has them, else its
FLOPs (sweep.expected_cost: images x FLOP per image x 3, with the measured NFE for its t1 where
given, else sweep.node_nfe_guess) over the measured rate of its kind. Attack jobs: their FLOPs
over the rate of the model they attack.
"""
from __future__ import annotations

import json
import math
import statistics

from .errors import ConfigError

KINDS = ("student", "teacher")


def load_costs(paths) -> dict:
    """Reads and merges costs files; a bad file or field is one ConfigError naming it."""
    merged = {"device": None, "rates": {}, "nfe_forward": {}, "seconds_per_epoch": {}}
    for path in paths:
        try:
            with open(path) as f:
                data = json.load(f)
        except OSError as e:
            raise ConfigError("costs", f"cannot read {path}: {e.strerror or e}") from None
        except ValueError as e:
            raise ConfigError("costs", f"{path} is not JSON: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError("costs", f"{path} must hold a JSON object")
        unknown = set(data) - set(merged) - {"width", "batch", "bf16_matmul_tflops", "options"}
        if unknown:
            raise ConfigError("costs", f"{path}: unknown field(s) {', '.join(sorted(unknown))}; "
                                       f"allowed: device, rates, nfe_forward, seconds_per_epoch")
        merged["device"] = data.get("device") or merged["device"]
        for part in ("rates", "nfe_forward", "seconds_per_epoch"):
            values = data.get(part, {})
            if not isinstance(values, dict):
                raise ConfigError("costs", f"{path}: {part} must be an object")
            for k, v in values.items():
                if part == "rates" and k not in KINDS:
                    raise ConfigError("costs", f"{path}: rates.{k} is unknown; allowed: {', '.join(KINDS)}")
                if not (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and math.isfinite(v)):
                    raise ConfigError("costs", f"{path}: {part}.{k} must be a finite number > 0, got {v!r}")
                merged[part][str(float(k)) if part == "nfe_forward" else k] = float(v)
    return merged


def costs_from_records(records) -> dict:
    """Median seconds per epoch of every finished job, and the median forward NFE per t1 of its
    students (the first epoch left out: it includes warm-up), from sweep records."""
    secs, nfe = {}, {}
    for rec in records:
        hist = [h for h in rec.get("history") or [] if isinstance(h, dict)]
        if rec.get("status") != "done" or not hist or "key" not in rec:
            continue
        body = hist[1:] or hist
        s = [h["seconds"] for h in body if isinstance(h.get("seconds"), (int, float))]
        if s:
            secs[rec["key"]] = statistics.median(s)
        t1 = ((rec.get("config") or {}).get("node") or {}).get("t1")
        n = [h["nfe_forward"] for h in body if isinstance(h.get("nfe_forward"), (int, float)) and h["nfe_forward"] > 0]
        if t1 is not None and n:
            nfe.setdefault(str(float(t1)), []).append(statistics.median(n))
    return {"seconds_per_epoch": secs, "nfe_forward": {k: statistics.median(v) for k, v in nfe.items()}}


def job_seconds(job, settings, costs: dict, model=None) -> tuple[float, str]:
    """(GPU-seconds, how: "measured" or "rate") of one job under these costs; ConfigError when the
    file has neither the job's seconds per epoch nor the rate its kind needs."""
    from .jobs import AttackJob, TeacherJob, job_config
    from .schedule import expected_cost

    if not isinstance(job, AttackJob) and job.key in costs["seconds_per_epoch"]:
        return job_config(job, settings).resolved_epochs() * costs["seconds_per_epoch"][job.key], "measured"
    target = model if isinstance(job, AttackJob) else job
    kind = "teacher" if isinstance(target, TeacherJob) else "student"
    rate = costs["rates"].get(kind)
    if rate is None:
        raise ConfigError("costs", f"no rates.{kind} and no seconds_per_epoch for {getattr(target, 'key', job)}; "
                                   f"run benchmarks/bench_student.py --out FILE on the GPU, or `nodekd costs` on a pilot run")
    gflop = expected_cost(job, settings, model, nfe=costs["nfe_forward"])
    return gflop / (rate * 1e3), "rate"
