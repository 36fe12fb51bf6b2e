"""What runs in Ray's workers: the data sets as numpy arrays in the object store, the Tune trainable that trains a
teacher or a student (teachers and students alike, checkpointed every epoch), and the logits and attack tasks.
driver.py schedules them."""
from __future__ import annotations

import dataclasses
import os
import tempfile
import warnings

import numpy as np

from ..data import ImageSet, load_dataset
from ..jobs import AttackJob, Settings, StudentJob, TeacherJob
from ..storage import Storage
from ..work import logit_table, run_attack, run_training
from .progress import quiet_trial

# ----------------------------------------------------------------------------- data in the object store


def _to_numpy(s: ImageSet) -> dict:
    return {"images": s.images.numpy(), "labels": s.labels.numpy(), "num_classes": s.num_classes, "name": s.name}


def _from_numpy(d: dict) -> ImageSet:
    import torch

    with warnings.catch_warnings():  # read-only object-store memory, never written to
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return ImageSet(torch.from_numpy(d["images"]), torch.from_numpy(d["labels"]), d["num_classes"], d["name"])


def data_from_ref(value) -> tuple[ImageSet, ImageSet]:
    return _from_numpy(value[0]), _from_numpy(value[1])


def _load_data(name: str, root: str, download: bool, synthetic_sizes) -> tuple[dict, dict]:
    train, test = load_dataset(name, root=root, download=download, synthetic_sizes=tuple(synthetic_sizes))
    return _to_numpy(train), _to_numpy(test)


# ----------------------------------------------------------------------------- trainables and tasks


def job_to_dict(job) -> dict:
    return {"type": type(job).__name__, "key": job.key, **dataclasses.asdict(job)}


def job_from_dict(d: dict):
    d = {k: v for k, v in d.items() if k != "key"}
    cls = {"TeacherJob": TeacherJob, "StudentJob": StudentJob, "AttackJob": AttackJob}[d.pop("type")]
    if cls is AttackJob:
        d["eps_255"] = tuple(d["eps_255"])
    return cls(**d)


def use_held_cpus() -> int:
    """torch's threads = the CPUs this Ray job holds (Ray sets OMP_NUM_THREADS from them when the worker
    starts; a worker reused for a job of another size keeps its first value without this)."""
    import ray
    import torch

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    if cpus:
        torch.set_num_threads(max(1, int(cpus)))
    return torch.get_num_threads()


def train_trial(config, *, data_refs, table_refs, settings, storage_root, resume_path=None):
    """The Tune function trainable for teachers and students alike. ``resume_path``: a checkpoint's
    state.pt in the storage to start from when Tune has none for this trial (the search's interrupted
    trials, run again in a new Tune experiment)."""
    import ray
    import torch
    from ray import tune

    use_held_cpus()
    quiet_trial()
    job = job_from_dict(config["job"])
    storage = Storage(storage_root)
    data = data_from_ref(ray.get(data_refs[job.dataset]))
    table = None
    if isinstance(job, StudentJob) and job.kd and job.logits_mode != "online":
        table = ray.get(table_refs[f"{job.teacher_job.key}-{job.logits_mode}"])
    resume = None
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            resume = torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=True)
    elif resume_path is not None:
        blob = storage.read_bytes(resume_path)
        if blob is not None:
            import io

            resume = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)

    def report(metrics, state):
        with tempfile.TemporaryDirectory() as d:
            torch.save(state, os.path.join(d, "state.pt"))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))

    run_training(job, Settings(**settings), storage, data, table=table, resume=resume, report=report,
                 held=ray.get_gpu_ids())


def _logits_task(teacher: dict, mode: str, settings: dict, storage_root: str, data) -> tuple[str, np.ndarray]:
    """Two returns: a small status (checked by the driver) and the table (fetched by students only)."""
    import ray

    use_held_cpus()
    table = logit_table(job_from_dict(teacher), mode, Settings(**settings), Storage(storage_root),
                        data_from_ref(data), held=ray.get_gpu_ids())
    return "ok", table


def _attack_task(job: dict, settings: dict, storage_root: str, data) -> str:
    import ray

    use_held_cpus()
    return run_attack(job_from_dict(job), Settings(**settings), Storage(storage_root), data_from_ref(data)[1],
                      held=ray.get_gpu_ids())
