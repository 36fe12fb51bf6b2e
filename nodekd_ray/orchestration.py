"""Runs sweeps on Ray: the only module of nodekd_ray that imports Ray.

Pipeline (sweep.py names the jobs and does their work; this module schedules it):
  1. data      one Ray task per data set reads it (a file lock guards downloads on each node)
               and returns it as numpy arrays into the object store; trials get references.
  2. teachers  a Ray Tune grid, one trial per (data set, ResNet, seed), checkpointed every epoch.
  3. logits    one Ray task per (teacher, logits mode) computes the table once; its result
               lives in the object store and reaches every student trial by reference through
               tune.with_parameters (read-only, zero-copy on the CPU). Student trials never load a
               teacher in "paper"/"views" mode; their teacher_forwards metric stays 0.
  4. students  a Ray Tune grid over teacher x T x horizon x data set plus the no-KD baselines,
               checkpointed every epoch (tune.report + tune.Checkpoint), retried from the last
               checkpoint up to FailureConfig(max_failures) times.
  5. attacks   one Ray task per (model, attack, eps chunk), each writing one Parquet file
               atomically into a hive-partitioned data set (sweep.ATTACK_SCHEMA).
  6. report    Markdown tables and the figure, from the Parquet files and trial records alone.

Rerunning a sweep skips every job whose output exists; ``--resume`` continues an interrupted
Tune experiment (finished trials are not rerun, unfinished ones restart from their checkpoints).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
import warnings

import numpy as np

from .data import DATASETS, ImageSet, load_dataset
from .errors import ConfigError
from .sweep import (SMOKE, AttackJob, Settings, Storage, StudentJob, SweepSpec, TeacherJob, logit_table, plan,
                    run_attack, run_training)

STAGES = ("teachers", "students")


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


def train_trial(config, *, data_refs, table_refs, settings, storage_root, device="auto"):
    """The Tune function trainable for teachers and students alike."""
    import ray
    import torch
    from ray import tune

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

    def report(metrics, state):
        with tempfile.TemporaryDirectory() as d:
            torch.save(state, os.path.join(d, "state.pt"))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))

    run_training(job, Settings(**settings), storage, data, table=table, resume=resume, report=report, device=device)


def _logits_task(teacher: dict, mode: str, settings: dict, storage_root: str, data) -> np.ndarray:
    return logit_table(job_from_dict(teacher), mode, Settings(**settings), Storage(storage_root), data_from_ref(data))


def _attack_task(job: dict, settings: dict, storage_root: str, data) -> str:
    return run_attack(job_from_dict(job), Settings(**settings), Storage(storage_root), data_from_ref(data)[1])


# ----------------------------------------------------------------------------- the driver


@dataclasses.dataclass
class Resources:
    cpus_per_trial: float = 1.0
    gpus_per_trial: float | None = None   # None: 1 when the cluster has GPUs, else 0
    max_failures: int = 2                 # Tune retries of a failed trial, from its last checkpoint
    attack_retries: int = 2               # Ray retries of an attack task whose worker died
    max_concurrent: int = 0               # 0: as many trials as the resources allow

    def validate(self):
        if self.cpus_per_trial <= 0:
            raise ConfigError("cpus_per_trial", f"must be > 0, got {self.cpus_per_trial}")
        if self.gpus_per_trial is not None and self.gpus_per_trial < 0:
            raise ConfigError("gpus_per_trial", f"must be >= 0, got {self.gpus_per_trial}")
        for name in ("max_failures", "attack_retries", "max_concurrent"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        return self


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """Joins a running Ray cluster (``ray submit``, RAY_ADDRESS, ``ray start``) or starts a local one."""
    import ray

    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in ("NODEKD_FAULTS",) if k in os.environ}
    kw = {"runtime_env": {"env_vars": env}} if env else {}
    if address == "local":  # always a fresh local instance, even where a cluster runs
        ray.init(num_cpus=num_cpus, include_dashboard=False, **kw)
        return
    if address:
        ray.init(address=address, **kw)
        return
    try:
        ray.init(address="auto", **kw)  # a cluster is running here: join it
    except (ConnectionError, RuntimeError, ValueError):
        ray.init(num_cpus=num_cpus, include_dashboard=False, **kw)


class SweepFailed(RuntimeError):
    pass


class SweepInterrupted(KeyboardInterrupt):
    pass


def run_sweep(specs, settings: Settings, storage_root: str, *, resources: Resources = Resources(), resume=False,
              address=None, num_cpus=None, log=print) -> dict:
    """Runs every stage of the given sweeps into one storage folder; returns a summary dict."""
    import ray

    specs = [s.validate() for s in specs]
    settings.validate()
    resources.validate()
    p = plan(specs, eps_per_task=settings.eps_per_task)
    storage = Storage(storage_root)
    storage.check_reachable()
    sweep_name = "+".join(s.name for s in specs)
    for stage in STAGES:
        if _experiments(storage, f"{sweep_name}-{stage}") and not resume and _unfinished(storage, p, stage):
            raise ConfigError("resume", f"{storage.name} holds unfinished trials of the '{sweep_name}' sweep "
                                        "(interrupted or failed); rerun with --resume to continue it, or use "
                                        "another --storage")
    storage.check_settings(settings, create=False)
    stale = storage.remove_stale_temporaries()
    if stale:
        log(f"removed {stale} partial file(s) left by killed writers")
    # Keeping one checkpoint per trial (num_to_keep=1; a NODE at width 512 with Adam state is
    # ~110 MB) makes Tune snapshot its experiment state often, and warn about it every time.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    connect(address, num_cpus)
    gpus = resources.gpus_per_trial
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    res = {"cpu": resources.cpus_per_trial, "gpu": gpus}
    t_start = time.perf_counter()
    summary = {"storage": storage.name, "tensorboard": storage.url(storage.path("tensorboard")), "failed": {},
               "seconds": {}}

    # 1. data: once per data set, into the object store
    load = ray.remote(num_cpus=1)(_load_data)
    t0 = time.perf_counter()
    root, download = settings.teacher.get("data_root", "data"), settings.teacher.get("download", False)
    sizes = settings.teacher.get("synthetic_sizes", (512, 256))
    datasets = sorted({j.dataset for j in p.jobs()} | {j.dataset for j in p.attacks})
    data_refs = {d: load.remote(d, root, download, sizes) for d in datasets}
    ray.wait(list(data_refs.values()), num_returns=len(data_refs))
    for d, ref in data_refs.items():  # surface a missing file as a one-line error, before any trial
        try:
            ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            cause = e.as_instanceof_cause()
            if isinstance(cause, ConfigError):
                raise ConfigError(cause.field, cause.message) from None
            raise
    summary["seconds"]["data"] = time.perf_counter() - t0
    try:  # only now: a missing data file leaves nothing behind
        storage.check_settings(settings, create=True)
    except OSError as e:  # e.g. a read-only folder, credentials that may read but not write
        raise ConfigError("storage", f"cannot write to {storage.name}: {str(e).strip().splitlines()[0]}") from None

    common = dict(data_refs=data_refs, settings=settings.to_dict(), storage_root=storage.root)

    # 2. teachers
    t0 = time.perf_counter()
    _tune_stage(f"{sweep_name}-teachers", p.teachers, storage, resources, res, resume, dict(common, table_refs={}), log)
    summary["seconds"]["teachers"] = time.perf_counter() - t0

    # 3. logits: one task per (teacher, mode); tables reach students by reference
    t0 = time.perf_counter()
    logits = ray.remote(_logits_task).options(num_cpus=res["cpu"], num_gpus=res["gpu"])
    table_refs, blocked = {}, {}
    for job in p.students:
        if not job.kd:
            continue
        tj = job.teacher_job
        if not storage.done(tj):
            blocked[job.key] = f"teacher {tj.key} did not finish"
            continue
        name = f"{tj.key}-{job.logits_mode}"
        if job.logits_mode != "online" and name not in table_refs and not storage.done(job):
            table_refs[name] = logits.remote(job_to_dict(tj), job.logits_mode, settings.to_dict(), storage.root,
                                             data_refs[job.dataset])
    if table_refs:
        ray.wait(list(table_refs.values()), num_returns=len(table_refs))
        log(f"logit tables ready: {len(table_refs)} (one task per teacher)")
    summary["seconds"]["logits"] = time.perf_counter() - t0

    # 4. students
    t0 = time.perf_counter()
    students = [j for j in p.students if j.key not in blocked]
    _tune_stage(f"{sweep_name}-students", students, storage, resources, res, resume,
                dict(common, table_refs=table_refs), log)
    summary["seconds"]["students"] = time.perf_counter() - t0

    for job in p.jobs():
        if not storage.done(job):
            rec = storage.read_record(job.key) or {}
            summary["failed"][job.key] = blocked.get(job.key) or rec.get("error") or "did not finish"

    # 5. attacks
    t0 = time.perf_counter()
    summary["attacks"] = _attack_stage(p.attacks, storage, settings, res, resources, data_refs, summary["failed"], log)
    summary["seconds"]["attacks"] = time.perf_counter() - t0

    # 6. report
    from .report import write_report

    summary["report"] = write_report(storage.root)
    summary["seconds"]["total"] = time.perf_counter() - t_start
    return summary


def _unfinished(storage: Storage, p, stage: str) -> bool:
    jobs = p.teachers if stage == "teachers" else p.students
    return any(not storage.done(j) for j in jobs)


def _experiments(storage: Storage, name: str) -> list[str]:
    """This stage's Tune experiment folders, oldest first: name, name-2, name-3, ..."""
    out, k = [], 1
    while True:
        path = storage.path("tune", name if k == 1 else f"{name}-{k}")
        if not storage.isdir(path):
            return out
        out.append(path)
        k += 1


def _tune_stage(name, jobs, storage, resources, res, resume, params, log) -> None:
    """Runs the stage's unfinished jobs as Tune trials.

    With resume, the latest experiment of this stage is restored first (finished trials stay
    finished, unfinished ones continue from their checkpoints, errored ones are retried). Jobs
    that no experiment holds yet (a grid grown since) then run in a new experiment name-N.
    """
    from ray import tune

    todo = [j for j in jobs if not storage.done(j)]
    if len(todo) < len(jobs):
        log(f"{name}: {len(jobs) - len(todo)} of {len(jobs)} trials already finished in {storage.name}")
    trainable = tune.with_resources(tune.with_parameters(train_trial, **params), res)
    existing = _experiments(storage, name)
    errored: set[str] = set()
    fs = _tune_filesystem(storage)
    if todo and resume and existing and tune.Tuner.can_restore(existing[-1], storage_filesystem=fs):
        log(f"{name}: resuming the Tune experiment in {storage.url(existing[-1])}")
        tuner = tune.Tuner.restore(existing[-1], trainable=trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=fs)
        held = set(storage.read_json(existing[-1] + ".jobs.json") or [])
        errored |= _fit(tuner, name, [j for j in jobs if j.key in held], storage, log)
        todo = [j for j in jobs if not storage.done(j) and j.key not in errored]
    if not todo:
        return
    exp = name if not existing else f"{name}-{len(existing) + 1}"
    # which jobs this experiment holds (Tune creates grid trials lazily, so its own state may not
    # list them all when it is interrupted)
    storage.write_json([j.key for j in todo], storage.path("tune", f"{exp}.jobs.json"))
    tuner = tune.Tuner(
        trainable,
        param_space={"job": tune.grid_search([job_to_dict(j) for j in todo])},
        tune_config=tune.TuneConfig(max_concurrent_trials=resources.max_concurrent or None,
                                    trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
        run_config=tune.RunConfig(
            name=exp, storage_path=storage.path("tune"), storage_filesystem=fs,
            failure_config=tune.FailureConfig(max_failures=resources.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            verbose=1),
    )
    _fit(tuner, name, todo, storage, log)


def _tune_filesystem(storage: Storage):
    """Tune's storage_filesystem: None for a local folder, else the storage's (S3, GCS, ...)."""
    return None if storage.local else storage.fs


def _fit(tuner, name, jobs, storage, log) -> set[str]:
    """Runs a Tuner over ``jobs``; returns the keys of errored trials; raises SweepInterrupted on Ctrl-C."""
    results = tuner.fit()
    errored = {r.config["job"]["key"] for r in results if r.error is not None and r.config}
    stopped = [j.key for j in jobs if not storage.done(j) and j.key not in errored]
    if stopped:  # Tune returns from fit() on Ctrl-C, with its state saved
        raise SweepInterrupted(f"{name}: interrupted with {len(stopped)} trial(s) unfinished; "
                               "rerun with --resume to continue")
    log(f"{name}: {len(results) - len(errored)} trials finished, {len(errored)} failed")
    return errored


def _trial_name(trial) -> str:
    return trial.config["job"]["key"]


def _attack_stage(jobs, storage, settings, res, resources, data_refs, failed, log) -> dict:
    import ray

    task = ray.remote(_attack_task).options(num_cpus=res["cpu"], num_gpus=res["gpu"],
                                            max_retries=resources.attack_retries)
    todo = [j for j in jobs if not storage.exists(storage.attack_file(j))]
    runnable = [j for j in todo if j.model_key not in failed]
    skipped = len(todo) - len(runnable)
    log(f"attacks: {len(jobs)} tasks, {len(jobs) - len(todo)} already written, {len(runnable)} to run"
        + (f", {skipped} skipped (their model failed)" if skipped else ""))
    pending = {task.remote(job_to_dict(j), settings.to_dict(), storage.root, data_refs[j.dataset]): j for j in runnable}
    done, errors = 0, {}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        job = pending.pop(ready[0])
        try:
            ray.get(ready[0])
            done += 1
            log(f"attacks: {done}/{len(runnable)} written ({job.key}, {job.attack})")
        except (ray.exceptions.RayTaskError, ray.exceptions.WorkerCrashedError, ray.exceptions.RayError) as e:
            errors[f"{job.key}/{job.attack}"] = str(e).strip().splitlines()[-1][:300]
            log(f"attacks: FAILED {job.key} ({job.attack}): {errors[f'{job.key}/{job.attack}']}")
    return {"planned": len(jobs), "written": done, "already": len(jobs) - len(todo), "failed": errors,
            "skipped": skipped}


# ----------------------------------------------------------------------------- sweep scripts


def sweep_parser(description: str, default_datasets=("cifar10", "svhn")) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--dataset", nargs="+", default=list(default_datasets), metavar="NAME",
                    help=f"data sets, from {', '.join(DATASETS)}")
    ap.add_argument("--smoke-test", action="store_true",
                    help="tiny models (NODE width 16), 5 teacher / 3 student epochs, 1024 training and 64 "
                         "attacked images, eps 0,4,..,20/255")
    ap.add_argument("--storage", default=os.environ.get("NODEKD_STORAGE"),
                    help="experiment folder: a local path, a shared mount, or a URI (s3://bucket/prefix, "
                         "gs://..., file://...); default $NODEKD_STORAGE, else runs/nodekd, or runs/nodekd-smoke "
                         "with --smoke-test")
    ap.add_argument("--resume", action="store_true", help="continue an interrupted sweep in --storage")
    ap.add_argument("--seeds", type=int, default=1, help="seeds per trial")
    ap.add_argument("--teachers", nargs="+", default=None, metavar="ARCH", help="override the sweep's teachers")
    ap.add_argument("--temperatures", nargs="+", type=float, default=None, metavar="T", help="override T")
    ap.add_argument("--horizons", nargs="+", type=float, default=None, metavar="T1", help="override the KD horizons")
    ap.add_argument("--baseline-horizons", nargs="+", type=float, default=None, metavar="T1",
                    help="override the horizons of the no-KD NODE baselines")
    ap.add_argument("--lam", type=float, default=0.9, help="KD weight lambda (paper 0.9)")
    ap.add_argument("--logits-mode", default="paper", help="paper, views or online (see nodekd_ray.kd)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs for teachers and students (default: paper)")
    ap.add_argument("--width", type=int, default=None, help="NODE width (default: paper, 512)")
    ap.add_argument("--attack-images", type=int, default=None, help="test images attacked (default 1000)")
    ap.add_argument("--data-root", default=os.environ.get("NODEKD_DATA_ROOT", "data"),
                    help="where cifar10/svhn live (default $NODEKD_DATA_ROOT, else data)")
    ap.add_argument("--download", action="store_true", help="download missing cifar10/svhn files")
    ap.add_argument("--cpus-per-trial", type=float, default=1.0)
    ap.add_argument("--gpus-per-trial", type=float, default=None,
                    help="may be fractional; default 1 when the cluster has GPUs, else 0")
    ap.add_argument("--max-failures", type=int, default=2, help="retries of a failed trial from its checkpoint")
    ap.add_argument("--attack-retries", type=int, default=2, help="retries of an attack task whose worker died")
    ap.add_argument("--max-concurrent", type=int, default=0, help="cap on trials at once (0: no cap)")
    ap.add_argument("--address", default=None, help="Ray cluster address; 'local' starts a fresh local instance (default: join a running cluster, else local)")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray instance")
    return ap


def settings_from_args(args) -> Settings:
    teacher, student = {}, {}
    attack_images = 1000
    if args.smoke_test:
        teacher, student = dict(SMOKE["teacher"]), dict(SMOKE["student"])
        attack_images = SMOKE["attack_images"]
    for d in (teacher, student):
        d["data_root"], d["download"] = args.data_root, args.download
        if args.epochs is not None:
            d["epochs"] = args.epochs
    if args.width is not None:
        student["width"] = args.width
    if args.attack_images is not None:
        attack_images = args.attack_images
    return Settings(teacher=teacher, student=student, attack_images=attack_images)


def apply_args(spec: SweepSpec, args) -> SweepSpec:
    kw = dict(datasets=tuple(args.dataset), seeds=tuple(range(args.seeds)), lam=args.lam, logits_mode=args.logits_mode)
    if args.teachers is not None:
        if spec.teachers:
            kw["teachers"] = tuple(args.teachers)
        if spec.kd_teachers:
            kw["kd_teachers"] = tuple(args.teachers)
    if args.temperatures is not None:
        kw["temperatures"] = tuple(args.temperatures)
    if args.horizons is not None:
        kw["kd_horizons"] = tuple(args.horizons)
    if args.baseline_horizons is not None and spec.baseline_horizons:
        kw["baseline_horizons"] = tuple(args.baseline_horizons)
    if args.smoke_test:
        kw["eps_255"] = tuple(e for e in SMOKE["eps_255"])
    return dataclasses.replace(spec, **kw)


def main(specs, argv=None, *, description: str, default_datasets=("cifar10", "svhn")) -> int:
    """Entry point of every sweep script: parse, validate, run, print where the results are."""
    ap = sweep_parser(description, default_datasets)
    args = ap.parse_args(argv)
    prog = os.path.basename(sys.argv[0]) if argv is None else "sweep"
    try:
        if args.seeds < 1:
            raise ConfigError("seeds", f"must be >= 1, got {args.seeds}")
        specs = [apply_args(s, args).validate() for s in specs]
        settings = settings_from_args(args).validate()
        resources = Resources(args.cpus_per_trial, args.gpus_per_trial, args.max_failures,
                              attack_retries=args.attack_retries, max_concurrent=args.max_concurrent).validate()
        storage = args.storage or ("runs/nodekd-smoke" if args.smoke_test else "runs/nodekd")
        summary = run_sweep(specs, settings, storage, resources=resources, resume=args.resume,
                            address=args.address, num_cpus=args.num_cpus)
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"{prog}: {e or 'interrupted'}; finished trials and files are kept: rerun with --resume",
              file=sys.stderr)
        return 130
    return print_summary(summary)


def print_summary(summary: dict) -> int:
    secs = ", ".join(f"{k} {v:.0f}s" for k, v in summary["seconds"].items())
    print(f"\ntime: {secs}")
    att = summary["attacks"]
    print(f"attacks: {att['written']} written, {att['already']} already there, {len(att['failed'])} failed")
    for key, why in summary["failed"].items():
        print(f"FAILED trial {key}: {why}")
    for key, why in att["failed"].items():
        print(f"FAILED attack {key}: {why}")
    print(f"results: {summary['storage']}")
    for what, path in summary["report"].items():
        print(f"{what}: {path}")
    print(f"TensorBoard: tensorboard --logdir {summary['tensorboard']}")
    return 1 if summary["failed"] or att["failed"] else 0


# ----------------------------------------------------------------------------- lambda / T search


def search_trial(config, *, base, **params):
    """One Optuna-proposed (lam, T): a KD student keyed by its rounded values."""
    job = dict(base, T=round(float(config["T"]), 3), lam=round(float(config["lam"]), 3))
    job["key"] = StudentJob(**{k: v for k, v in job.items() if k not in ("type", "key")}).key
    train_trial({"job": job}, **params)


def run_search(*, dataset: str, teacher: str, t1: float, logits_mode: str, num_samples: int, settings: Settings,
               storage_root: str, resources: Resources, lam_range=(0.0, 1.0), T_range=(1.0, 30.0),
               grace_period: int = 1, address=None, num_cpus=None, log=print) -> dict:
    """Optuna TPE over (lam, T) through Ray Tune's OptunaSearch, with ASHA early stopping.

    The Optuna study lives in STORAGE/optuna.journal (a file journal), so a rerun continues it:
    TPE sees every earlier trial and only the missing samples run. Returns the best (lam, T).
    """
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    if num_samples < 1:
        raise ConfigError("num_samples", f"must be >= 1, got {num_samples}")
    if not (0 <= lam_range[0] < lam_range[1] <= 1):
        raise ConfigError("lam_range", f"need 0 <= low < high <= 1, got {lam_range}")
    if not (0 < T_range[0] < T_range[1]):
        raise ConfigError("T_range", f"need 0 < low < high, got {T_range}")
    teacher_spec = SweepSpec(f"search-{dataset}", datasets=(dataset,), teachers=(teacher,))
    summary = run_sweep([teacher_spec], settings, storage_root, resources=resources, address=address,
                        num_cpus=num_cpus, log=log, resume=True)
    storage = Storage(storage_root)
    tj = TeacherJob(dataset, teacher)
    if not storage.done(tj):
        raise SweepFailed(f"teacher {tj.key} did not finish: {summary['failed'].get(tj.key)}")
    import ray

    data_ref = ray.remote(num_cpus=1)(_load_data).remote(
        dataset, settings.teacher.get("data_root", "data"), settings.teacher.get("download", False),
        settings.teacher.get("synthetic_sizes", (512, 256)))
    table_refs = {}
    if logits_mode != "online":
        table_refs[f"{tj.key}-{logits_mode}"] = ray.remote(_logits_task).remote(
            job_to_dict(tj), logits_mode, settings.to_dict(), storage.root, data_ref)
    study_name = f"lam-T-{dataset}-{teacher}-t{t1:g}-{logits_mode}"
    sync = _JournalSync(storage)
    journal = JournalStorage(JournalFileBackend(sync.local))
    study = optuna.create_study(study_name=study_name, storage=journal, direction="maximize", load_if_exists=True)
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    remaining = max(0, num_samples - len(finished))
    log(f"optuna study {study_name!r}: {len(finished)} finished trials in {sync.url}, {remaining} to run")
    gpus = resources.gpus_per_trial
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    if remaining:
        base = {"type": "StudentJob", "dataset": dataset, "t1": float(t1), "seed": 0, "teacher": teacher,
                "T": None, "lam": None, "logits_mode": logits_mode}
        trainable = tune.with_resources(
            tune.with_parameters(search_trial, base=base, data_refs={dataset: data_ref}, table_refs=table_refs,
                                 settings=settings.to_dict(), storage_root=storage.root),
            {"cpu": resources.cpus_per_trial, "gpu": gpus})
        searcher = OptunaSearch(metric="test_accuracy", mode="max", study_name=study_name, storage=journal, seed=0)
        tuner = tune.Tuner(
            trainable,
            param_space={"lam": tune.uniform(*lam_range), "T": tune.loguniform(*T_range)},
            tune_config=tune.TuneConfig(search_alg=searcher, num_samples=remaining, metric="test_accuracy", mode="max",
                                        scheduler=ASHAScheduler(time_attr="training_iteration",
                                                                grace_period=grace_period, reduction_factor=2),
                                        max_concurrent_trials=resources.max_concurrent or None),
            run_config=tune.RunConfig(name=f"{study_name}-{len(finished)}", storage_path=storage.path("tune"),
                                      storage_filesystem=_tune_filesystem(storage),
                                      failure_config=tune.FailureConfig(max_failures=resources.max_failures),
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1), verbose=1,
                                      callbacks=[sync.callback()]),
        )
        try:
            tuner.fit()
        finally:
            sync.upload()
    study = optuna.load_study(study_name=study_name, storage=journal)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        raise SweepFailed("no search trial finished")
    best = max(done, key=lambda t: t.value)
    out = {"study": study_name, "trials": len(done), "best_lam": best.params["lam"], "best_T": best.params["T"],
           "best_test_accuracy": best.value, "journal": sync.url}
    storage.write_json(out, storage.path(f"{study_name}.json"))
    return out


class _JournalSync:
    """The Optuna journal: STORAGE/optuna.journal itself when the storage is local. A journal is a
    file-locked log that an object store cannot hold in place, so for a URI storage the driver
    works on a local copy, downloaded first and uploaded while trials finish and at the end."""

    def __init__(self, storage: Storage):
        self.storage, self.remote = storage, storage.path("optuna.journal")
        self.url = storage.url(self.remote)
        self.local = self.remote if storage.local else storage.staging("optuna.journal")
        self._uploaded = None
        if not storage.local:
            if not storage.download(self.remote, self.local) and os.path.exists(self.local):
                os.remove(self.local)  # a copy from an earlier folder of the same name: the storage decides
            os.makedirs(os.path.dirname(self.local), exist_ok=True)

    def upload(self) -> None:
        if self.storage.local or not os.path.exists(self.local):
            return
        stamp = os.stat(self.local).st_size
        if stamp != self._uploaded:
            with open(self.local, "rb") as f:
                self.storage.write_bytes(self.remote, f.read())
            self._uploaded = stamp

    def callback(self):
        from ray import tune

        sync = self

        class UploadJournal(tune.Callback):
            def on_step_end(self, iteration, trials, **info):
                if iteration % 20 == 0:
                    sync.upload()

            def on_trial_complete(self, iteration, trials, trial, **info):
                sync.upload()

        return UploadJournal()
