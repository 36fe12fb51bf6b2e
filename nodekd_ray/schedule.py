"""Expected cost and order: the relative compute of each job (never a result), the longest-first order a stage
hands its jobs to Tune in, and list scheduling for --dry-run's estimate. costs.py turns the same expected cost into
GPU-hours with measured rates."""
from __future__ import annotations

import math

from .errors import ConfigError
from .jobs import AttackJob, Settings, TeacherJob, job_config
from .models import RESNET_DEPTHS


# Training-set sizes, for the cost estimate only (the sweep reads the real data).
TRAIN_SIZES = {"cifar10": 50_000, "svhn": 73_257, "digits": 1_437, "synthetic": 512}
RESNET_GFLOP = 0.041 / 18          # per image and conv layer (depth - 2 of them): ResNet20 ~0.041, ResNet110 ~0.25
NODE_GFLOP_512 = 1.2               # one ODE-function evaluation at width 512, 8x8 state (design notes)
NFE_T1_1 = 26                      # forward evaluations of dopri5 at rtol 1e-3 for t1 = 1 (~4 steps)


def node_nfe_guess(t1: float) -> float:
    """Forward evaluations per solve: a guess that grows with log t1, to be replaced by measured
    NFE (the records hold them). Only the order of jobs depends on it, never a result."""
    return NFE_T1_1 * (1.0 + math.log10(max(float(t1), 1.0)))


def expected_cost(job, settings: "Settings", model=None, nfe: dict | None = None) -> float:
    """Relative compute of a job (GFLOP): images seen x FLOP per image x 3 (forward + backward).

    An attack job needs the job of the model it attacks (``model``): images x eps values x about
    20 steps x 2. nfe: measured forward NFE per solve by str(float(t1)) (costs.py), else a guess.
    Used to order jobs longest-first and to print plans (costs.py turns it into GPU-hours with a
    measured rate); never a result.
    """
    if isinstance(job, AttackJob):
        n = settings.attack_images or 10_000
        return 2.0 * 20 * n * len(job.eps_255) * (_per_image_gflop(model, settings, nfe) if model else 1.0)
    images = job_config(job, settings).resolved_epochs() * _train_images(job, settings)
    return 3.0 * images * _per_image_gflop(job, settings, nfe)


def _train_images(job, settings) -> int:
    limit = job_config(job, settings).limit_train
    return min(limit or TRAIN_SIZES[job.dataset], TRAIN_SIZES[job.dataset])


def _per_image_gflop(job, settings, nfe: dict | None = None) -> float:
    if isinstance(job, TeacherJob):
        return RESNET_GFLOP * (RESNET_DEPTHS[job.arch] - 2)
    evals = (nfe or {}).get(str(float(job.t1))) or node_nfe_guess(job.t1)
    return NODE_GFLOP_512 * (job_config(job, settings).node.width / 512) ** 2 * evals


def longest_first(jobs, settings: "Settings", models: dict | None = None) -> list:
    """Jobs in decreasing expected cost (stable for ties), the order a stage hands them to Tune.
    models: key -> job, for attack jobs (their cost is their model's)."""
    models = models or {}
    return sorted(jobs, key=lambda j: -expected_cost(j, settings, models.get(getattr(j, "model_key", None))))


def list_schedule(stages, workers: int) -> dict:
    """Greedy list scheduling of stages of job costs on ``workers`` identical GPUs, each stage
    starting when the previous one has finished (the sweep's barriers). Returns the makespan and
    the fraction of GPU time left idle: an estimate for plans, not a measurement."""
    if workers < 1:
        raise ConfigError("workers", f"must be >= 1, got {workers}")
    t = 0.0
    busy = 0.0
    for costs in stages:
        free = [t] * workers
        for c in costs:
            i = min(range(workers), key=free.__getitem__)
            free[i] += c
            busy += c
        t = max(free) if costs else t
    return {"makespan": t, "idle_fraction": 1.0 - busy / (t * workers) if t else 0.0}
