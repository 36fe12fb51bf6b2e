"""The sweep driver: connects to Ray, runs the stages, collects failures.

Pipeline (sweep.py names the jobs and does their work; this module schedules it):
  1. data      one Ray task per data set reads it (a file lock guards downloads on each node)
               and returns it as numpy arrays into the object store; trials get references.
  2. teachers  a Ray Tune grid of the ResNet teachers, longest expected first
               (sweep.longest_first), checkpointed every epoch: the short stage (see stages()).
  3. logits    one Ray task per (teacher, logits mode) computes the table once; its result
               lives in the object store and reaches every student trial by reference through
               tune.with_parameters (read-only, zero-copy on the CPU). Student trials never load a
               teacher in "paper"/"views" mode; their teacher_forwards metric stays 0. A failed
               logits task ends its students at once, with the teacher and the cause.
  4. students  a Ray Tune grid of every NODE student, KD or not, longest expected first (NODE(500)
               starts first, not last), checkpointed every epoch (tune.report + tune.Checkpoint), retried from the last checkpoint up to
               FailureConfig(max_failures) times.
  5. attacks   one Ray task per (model, attack, eps chunk), each writing one Parquet file
               atomically into a hive-partitioned data set (sweep.ATTACK_SCHEMA).
  6. report    Markdown tables and the figure, from the Parquet files and trial records alone.

GPUs: every trial and task asks Ray for ``gpus_per_trial`` GPUs, 1 by default on a cluster even
before a GPU node is up, so that the autoscaler starts GPU workers (see gpu_request). Inside a job
the device follows what Ray assigned (devices.placement_device), and records and Parquet rows
store the GPUs held and the device used.

Rerunning a sweep skips every job whose output exists; ``--resume`` continues an interrupted
Tune experiment (finished trials are not rerun, unfinished ones restart from their checkpoints).
"""
from __future__ import annotations

import dataclasses
import os
import signal
import sys
import tempfile
import threading
import time
import warnings

import numpy as np

from ..config_cli import opt
from ..data import ImageSet, load_dataset
from ..devices import LOGICAL_GPUS_ENV
from ..errors import NO_SPACE, ConfigError, StorageFull, is_no_space
from ..faults import ENV as FAULTS_ENV
from .progress import quiet_trial, quiet_tune, stage_progress
from ..lock import StorageLock
from ..storage import Damaged
from ..sweep import (AttackJob, Settings, Storage, StudentJob, TeacherJob, attack_problem, job_config, logit_table,
                     longest_first, plan, run_attack, run_training)

FORWARDED_ENV = (FAULTS_ENV, LOGICAL_GPUS_ENV)   # reach every Ray worker through runtime_env


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


# ----------------------------------------------------------------------------- the driver


@dataclasses.dataclass
class Resources:
    # the sweep scripts' "cluster and resources" options are generated from these fields (config_cli.py)
    cpus_per_trial: float | None = opt(None, "CPUs each trial, logits and attack job asks for; none (auto): a GPU "
                                             "node's CPUs per GPU for a job holding GPUs, e.g. 8 on a g5.2xlarge "
                                             "(Ray caps a job's threads at its CPUs), 1 for a CPU job")
    gpus_per_trial: float | None = opt(None, "GPUs each trial, logits and attack job asks for, may be fractional; "
                                             "none: 1 on a cluster (also before a GPU node is up: the autoscaler "
                                             "starts one), else 1 if this machine has a GPU; 0 runs on CPUs")
    max_failures: int = opt(2, "retries of a failed trial from its last checkpoint")
    attack_retries: int = opt(2, "retries of an attack task whose worker died")
    max_concurrent: int = opt(0, "cap on trials at once; 0: as many as the resources allow")

    def validate(self):
        if self.cpus_per_trial is not None and not 0 < self.cpus_per_trial < float("inf"):
            raise ConfigError("cpus_per_trial", f"must be > 0 and finite, got {self.cpus_per_trial}")
        if self.gpus_per_trial is not None and not 0 <= self.gpus_per_trial < float("inf"):
            raise ConfigError("gpus_per_trial", f"must be >= 0 and finite, got {self.gpus_per_trial}")
        for name in ("max_failures", "attack_retries", "max_concurrent"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        return self

    def request(self, on_cluster: bool, local_gpus: float = 0.0, cpus_per_gpu: float | None = None) -> dict:
        """What every GPU-worthy job (trials, logits and attack tasks) asks Ray for.

        On a cluster the default is 1 GPU whether or not a GPU node is up yet: an autoscaling
        cluster starts with a CPU head only, and the autoscaler launches GPU workers only for
        jobs that ask for GPUs. On a fresh local instance the default is 1 if this machine has a
        GPU, else 0. --gpus-per-trial 0 forces CPUs.

        CPUs (--cpus-per-trial, default auto): a job holding GPUs asks for its share of a GPU node's
        CPUs (``cpus_per_gpu``, from gpu_node_cpus_per_gpu): Ray caps a task's torch threads at the
        CPUs it holds, and one CPU left the other 7 of a g5.2xlarge idle. A CPU job asks for 1, so that
        trials run side by side on the cores.
        """
        gpus = self.gpus_per_trial
        if gpus is None:
            gpus = 1.0 if on_cluster or local_gpus > 0 else 0.0
        cpus = self.cpus_per_trial
        if cpus is None:
            cpus = max(1.0, float(int(gpus * cpus_per_gpu))) if gpus > 0 and cpus_per_gpu else 1.0
        return {"cpu": cpus, "gpu": gpus}


def gpu_node_cpus_per_gpu(nodes=None, bootstrap: str = "~/ray_bootstrap_config.yaml") -> float | None:
    """CPUs per GPU of the GPU nodes that jobs will run on: the fewest among the live nodes with GPUs,
    else among the GPU node types of the autoscaler's config (``ray up`` writes it to the head, where
    the sweep's driver runs), else None (no GPU node known: jobs ask for 1 CPU)."""
    if nodes is None:
        import ray

        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    ratios = [r["CPU"] / r["GPU"] for r in nodes if r.get("GPU", 0) > 0 and r.get("CPU", 0) > 0]
    if not ratios:
        path = os.path.expanduser(bootstrap)
        if os.path.exists(path):
            try:
                import yaml

                with open(path) as f:
                    types = (yaml.safe_load(f) or {}).get("available_node_types", {})
                ratios = [t["resources"]["CPU"] / t["resources"]["GPU"] for t in types.values()
                          if t.get("resources", {}).get("GPU", 0) > 0 and t["resources"].get("CPU", 0) > 0]
            except (OSError, ValueError, KeyError, TypeError, ImportError):
                ratios = []
    return min(ratios) if ratios else None


def running_cluster() -> str | None:
    """The address of a running Ray cluster that a driver started here should join: RAY_ADDRESS,
    else the latest ``ray start`` on this machine (as ray.init(address="auto") finds it); None if none."""
    from ray._private import services

    try:
        return services.get_ray_address_from_environment(None, None)
    except Exception:  # noqa: BLE001 - nothing to join
        return None


_JOINED = False   # whether this process's Ray connection is to a cluster (set by connect)
PROBE_TIMEOUT_S = 5.0


def _unreachable(target: str) -> str | None:
    """Why nothing answers at a cluster address (a TCP connect to its GCS port), or None when something
    does or the address is not host:port. ray.init waits for a GCS that is gone for minutes (more than 10
    for one named by a stale /tmp/ray/ray_current_cluster, measured), so this is asked first."""
    import socket

    host, sep, port = target.split("://", 1)[-1].rpartition(":")
    if not sep or not port.isdigit():
        return None
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT_S).close()
    except OSError as e:
        return f"nothing answers there ({e.strerror or type(e).__name__})"
    return None


def connect(address: str | None = None, num_cpus: int | None = None, log=print) -> bool:
    """Joins the Ray cluster at ``address`` (or the running one found here) or, when there is none,
    starts a local instance; ``address="local"`` always starts a local one. Returns True when it
    joined a cluster. A cluster that was named or found but cannot be joined is a one-line
    ``address:`` error, never a silent local instance. Prints the cluster's resources."""
    import ray

    global _JOINED
    if ray.is_initialized():  # connected before (a second sweep in one process, a benchmark)
        return _JOINED
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    kw = {"runtime_env": {"env_vars": env}} if env else {}
    target = None if address == "local" else (address or running_cluster())
    if target is None:   # "local", not None: given None, ray.init joins the cluster a `ray start` left in
        # /tmp/ray/ray_current_cluster (a stale one too) and refuses num_cpus there
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **kw)
        log(f"started a local Ray instance: {_resources_line()}")
        _JOINED = False
        return False
    hint = "is it running? --address local starts a fresh local instance instead"
    if not address and not os.environ.get("RAY_ADDRESS"):
        from ray._private.utils import get_ray_address_file

        hint = (f"it is named in {get_ray_address_file(None)}, which a `ray start` on this machine wrote; if that "
                "cluster is gone, `ray stop` clears it, or --address local starts a fresh local instance")
    why = _unreachable(target)
    if why is None:
        try:  # a cluster found here is joined as "auto": only then does Ray 2.60 use the token `ray start` wrote
            ray.init(address=address or "auto", **kw)
        except Exception as e:  # noqa: BLE001 - ConnectionError, RuntimeError, ValueError, gRPC errors
            why = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    if why is not None:
        raise ConfigError("address", f"cannot join the Ray cluster at {target}: {why} ({hint})")
    log(f"joined the Ray cluster at {target}: {_resources_line()}")
    _JOINED = True
    return True


def _resources_line() -> str:
    import ray

    total = ray.cluster_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    mem = total.get("memory", 0) / 2**30
    return (f"{len(nodes)} node(s), {total.get('CPU', 0):g} CPUs, {total.get('GPU', 0):g} GPUs, "
            f"{mem:.0f} GiB memory")


class SweepFailed(RuntimeError):
    pass


def _refused(storage: Storage, existed: bool, err: Exception) -> Exception:
    """Marks an error raised before any work: run_sweep then removes a folder it created only
    for its lock (a local folder only when it is empty), so a refused sweep leaves nothing behind."""
    err.before_work = not existed
    return err


class SweepInterrupted(KeyboardInterrupt):
    pass


class CtrlC:
    """A SIGINT handler for a whole sweep that remembers a Ctrl-C as well as raising KeyboardInterrupt
    where it lands, so that the sweep stops at its next step even when the KeyboardInterrupt is
    swallowed where it was raised.

    It can be: a Ctrl-C sent while the local Ray instance started (2.9 s after the sweep took its
    lock, 2 CPUs) was lost in about 1 of 20 tries, and the sweep ran to the end with exit 0
    (tests/test_integrity_sweep.py::test_ctrl_c_while_starting_is_one_line_and_releases_the_lock
    failed so on 2026-12-01). Python's own handler was installed throughout; the KeyboardInterrupt
    it raised did not reach the sweep.

    The handler is installed also where the sweep started with SIGINT ignored (a job that a script
    put in the background with `&` inherits that), as Tune's fit() does: `kill -INT` stops a sweep
    the same way wherever it runs.

    Where Python swallows the KeyboardInterrupt (it landed in a finalizer or a weakref callback), it
    prints "Exception ignored in ..." and a traceback; the sweep's hook for those drops them, as the
    Ctrl-C is remembered here and ends the sweep in one line (a fresh-clone CI run printed one while
    the local Ray instance started: "File "<string>", line 0 ... in _on_sigint"). Every other
    unraisable exception goes to the hook that was there before.
    """

    def __init__(self):
        self.seen = False
        self._main = threading.current_thread() is threading.main_thread()   # signal handlers: main thread only
        self._before = None
        self._hook_before = None

    def _on_sigint(self, sig, frame):
        self.seen = True
        raise KeyboardInterrupt

    def _unraisable(self, unraisable):
        if self.seen and isinstance(unraisable.exc_value, KeyboardInterrupt):
            return
        (self._hook_before or sys.__unraisablehook__)(unraisable)

    def __enter__(self):
        if self._main:
            self._before = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._on_sigint)
            self._hook_before, sys.unraisablehook = sys.unraisablehook, self._unraisable
        return self

    def __exit__(self, *exc):
        if self._main:
            signal.signal(signal.SIGINT, self._before if self._before is not None else signal.default_int_handler)
            sys.unraisablehook = self._hook_before
        return False

    def check(self) -> None:
        """Raises SweepInterrupted if a Ctrl-C arrived, whether or not its KeyboardInterrupt got through."""
        if self.seen:
            raise SweepInterrupted()


def exit_now(rc: int) -> None:
    """Ends a sweep script that was interrupted, once its one-line message is printed and its lock
    released, without Ray's exit-time shutdown: after a Ctrl-C that shutdown can crash with SIGSEGV
    in the core worker's disconnect (ray-project/ray#51527; seen once in CI, rc -11 after the right
    message). The processes of a local instance die with this one (Ray starts them fate-sharing);
    Tune has already saved the experiment state when the interrupt reaches the script."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def _remove_new_folder(storage: Storage) -> None:
    try:
        if storage.local:
            os.rmdir(storage.base)
    except OSError:
        pass


def stages(p, settings: Settings) -> dict:
    """The two Tune stages' jobs, each longest expected first: the teachers, then every student.

    Why the no-KD NODEs do not run with the teachers: they are the longest jobs of a sweep
    (NODE(500) on CIFAR10 alone is ~4% of the paper's compute, the ten teachers together ~0.3%),
    so in the teachers' stage they become the barrier that every KD student waits behind. The
    list-scheduling estimate of --dry-run for sweeps/paper.py on 8 GPUs: 20.7% of GPU time idle
    in grid order, 19.7% with the no-KD NODEs beside the teachers, 1.2% with this order.
    """
    return {"teachers": longest_first(p.teachers, settings), "students": longest_first(p.students, settings)}


def run_sweep(specs, settings: Settings, storage_root: str, *, resources: Resources = Resources(), resume=False,
              address=None, num_cpus=None, log=print) -> dict:
    """Runs every stage of the given sweeps into one storage folder, holding its lock (lock.py);
    returns a summary dict."""
    specs = [s.validate() for s in specs]
    settings.validate()
    resources.validate()
    p = plan(specs, eps_per_task=settings.eps_per_task)
    staged = stages(p, settings)
    storage = Storage(storage_root)
    storage.warn = log
    storage.check_writable()
    sweep_name = "+".join(s.name for s in specs)
    existed = storage.isdir(storage.base)
    with CtrlC() as ctrl_c:  # before the lock: a Ctrl-C once the lock is taken releases it
        lock = StorageLock(storage, f"the {sweep_name} sweep", log=log).acquire()
        refused = False
        try:
            return _run_sweep(p, staged, specs, settings, storage, sweep_name, resources, resume, address, num_cpus,
                              log, existed, ctrl_c)
        except ConfigError as e:
            refused = getattr(e, "before_work", False)
            raise
        finally:
            lock.release()
            if refused:
                _remove_new_folder(storage)


def _run_sweep(p, staged, specs, settings, storage, sweep_name, resources, resume, address, num_cpus, log,
               existed, ctrl_c: CtrlC) -> dict:
    """run_sweep's work, inside the storage folder's lock; ctrl_c.check() between its steps."""
    import ray

    for stage, jobs in staged.items():
        # a job whose record says done but whose model is missing or damaged is simply redone
        if (_experiments(storage, f"{sweep_name}-{stage}") and not resume
                and any(not storage.done(j) and not storage.stale_done(j) for j in jobs)):
            raise _refused(storage, existed, ConfigError(
                "resume", f"{storage.name} holds unfinished trials of the '{sweep_name}' sweep (interrupted or "
                          "failed); rerun with --resume to continue it, or use another --storage"))
    try:
        storage.check_settings(settings, create=False)
    except ConfigError as e:
        raise _refused(storage, existed, e) from None
    stale = storage.remove_stale_temporaries()
    if stale:
        log(f"removed {stale} partial file(s) left by killed writers")
    # Keeping one checkpoint per trial (num_to_keep=1; a NODE at width 512 with Adam state is
    # ~110 MB) makes Tune snapshot its experiment state often, and warn about it every time.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    quiet_tune()
    on_cluster = connect(address, num_cpus, log=log)
    ctrl_c.check()
    res = resources.request(on_cluster, ray.cluster_resources().get("GPU", 0), gpu_node_cpus_per_gpu())
    if settings.student.get("norm_impl") == "triton" and not res["gpu"]:
        raise _refused(storage, existed, ConfigError(
            "norm_impl", "'triton' runs its kernels on GPUs, and this sweep's trials get none (--gpus-per-trial "
                         "0, or no GPU here); use norm_impl torch"))
    _log_request(res, log)
    t_start = time.perf_counter()
    summary = {"storage": storage.name, "tensorboard": storage.url(storage.path("tensorboard")), "failed": {},
               "seconds": {}, "request": res}

    # 1. data: once per data set, into the object store
    t0 = time.perf_counter()
    datasets = sorted({j.dataset for j in p.jobs()} | {j.dataset for j in p.attacks})
    data_refs = {d: _data_ref(d, settings) for d in datasets}
    ray.wait(list(data_refs.values()), num_returns=len(data_refs))
    for d, ref in data_refs.items():  # surface a missing file as a one-line error, before any trial
        try:
            ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            cause = e.as_instanceof_cause()
            if isinstance(cause, ConfigError):
                raise _refused(storage, existed, ConfigError(cause.field, cause.message)) from None
            raise
    summary["seconds"]["data"] = time.perf_counter() - t0
    ctrl_c.check()
    try:  # only now: a missing data file leaves nothing behind
        storage.check_settings(settings, create=True)
        # what this sweep set out to make, for `nodekd verify` (which lists what is missing)
        storage.write_json({"models": [j.key for j in p.jobs()], "attacks": [job_to_dict(a) for a in p.attacks]},
                           storage.path("plans", f"{sweep_name}.json"))
    except OSError as e:  # e.g. a read-only folder, credentials that may read but not write
        raise ConfigError("storage", f"cannot write to {storage.name}: {str(e).strip().splitlines()[0]}") from None

    common = dict(data_refs=data_refs, settings=settings.to_dict(), storage_root=storage.root)

    # 2. teachers
    t0 = time.perf_counter()
    _tune_stage(f"{sweep_name}-teachers", staged["teachers"], storage, resources, res, resume,
                dict(common, table_refs={}), log)
    summary["seconds"]["teachers"] = time.perf_counter() - t0
    ctrl_c.check()

    # 3. logits: one task per (teacher, mode); tables reach students by reference
    t0 = time.perf_counter()
    table_refs, blocked = logit_tables(staged["students"], settings, storage, res, data_refs, log)
    summary["seconds"]["logits"] = time.perf_counter() - t0
    ctrl_c.check()

    # 4. students, with and without KD
    t0 = time.perf_counter()
    students = [j for j in staged["students"] if j.key not in blocked]
    _tune_stage(f"{sweep_name}-students", students, storage, resources, res, resume,
                dict(common, table_refs=table_refs), log)
    summary["seconds"]["students"] = time.perf_counter() - t0
    ctrl_c.check()

    for job in p.jobs():
        if not storage.done(job):
            rec = storage.read_record(job.key) or {}
            summary["failed"][job.key] = blocked.get(job.key) or rec.get("error") or "did not finish"

    # 5. attacks, longest expected first
    t0 = time.perf_counter()
    attacks = longest_first(p.attacks, settings, {j.key: j for j in p.jobs()})
    summary["attacks"] = _attack_stage(attacks, storage, settings, res, resources, data_refs, summary["failed"], log,
                                       ctrl_c)
    summary["seconds"]["attacks"] = time.perf_counter() - t0
    ctrl_c.check()

    # 6. report
    from ..report import write_report

    summary["verdicts"] = []
    summary["report"] = write_report(storage.root, verdicts=summary["verdicts"])
    summary["seconds"]["total"] = time.perf_counter() - t_start
    return summary


def _log_request(res: dict, log) -> None:
    import ray

    line = f"every trial, logits and attack job asks for {res['cpu']:g} CPU and {res['gpu']:g} GPU"
    if res["gpu"] > 0 and ray.cluster_resources().get("GPU", 0) == 0:
        line += ("; no GPU node is up yet: jobs wait for the autoscaler to start GPU workers "
                 "(--gpus-per-trial 0 runs on CPUs)")
    log(line)


def _data_ref(dataset: str, settings: Settings):
    import ray

    return ray.remote(num_cpus=1)(_load_data).remote(
        dataset, settings.teacher.get("data_root", "data"), settings.teacher.get("download", False),
        settings.teacher.get("synthetic_sizes", (512, 256)))


def logit_tables(students, settings: Settings, storage: Storage, res: dict, data_refs: dict, log):
    """Starts one logits task per (teacher, mode) that unfinished KD students need and waits for
    them. Returns (table_refs, blocked): object references by "{teacher key}-{mode}", and the
    students that cannot run (their teacher did not finish, or its logits task failed) with why."""
    import ray

    task = ray.remote(_logits_task).options(num_cpus=res["cpu"], num_gpus=res["gpu"], num_returns=2)
    table_refs, status_refs, users, blocked = {}, {}, {}, {}
    for job in (j for j in students if j.kd):
        tj = job.teacher_job
        if not storage.done(tj):
            blocked[job.key] = f"teacher {tj.key} did not finish"
            continue
        name = f"{tj.key}-{job.logits_mode}"
        if job.logits_mode == "online" or storage.done(job):
            continue
        users.setdefault(name, []).append(job.key)
        if name not in table_refs:  # the status is small: failures show without fetching the table
            status_refs[name], table_refs[name] = task.remote(job_to_dict(tj), job.logits_mode, settings.to_dict(),
                                                              storage.root, data_refs[job.dataset])
    for name, ref in status_refs.items():
        try:
            ray.get(ref)
        except ray.exceptions.RayError as e:
            why = _cause(e)
            log(f"logits: FAILED {name}: {why}; its {len(users[name])} student(s) will not run")
            for key in users[name]:
                blocked[key] = f"logits of teacher {name} failed: {why}"
            del table_refs[name]
    if table_refs:
        log(f"logit tables ready: {len(table_refs)} (one task per teacher)")
    return table_refs, blocked


def _cause(e: Exception) -> str:
    """One line for a failed Ray task: the last line of its error, "Type: message"."""
    return (str(e).strip().splitlines() or [type(e).__name__])[-1][:300]


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
    if todo and resume and existing and not _restorable(storage, existing[-1]):
        log(f"{name}: the Tune experiment in {storage.url(existing[-1])} saved no state (stopped as it began); "
            "its unfinished trials start in a new experiment")
    if todo and resume and existing and _restorable(storage, existing[-1]) \
            and tune.Tuner.can_restore(existing[-1], storage_filesystem=fs):
        log(f"{name}: resuming the Tune experiment in {storage.url(existing[-1])}")
        try:   # a restored Tuner keeps its saved run config: Tune's own verbosity, not our progress line
            tuner = tune.Tuner.restore(existing[-1], trainable=trainable, resume_unfinished=True,
                                       resume_errored=True, storage_filesystem=fs)
        except Exception as e:  # noqa: BLE001 - Tune's own state is damaged; our records decide what is done
            log(f"{name}: cannot restore {storage.url(existing[-1])} ({_cause(e)}); its unfinished trials start "
                "afresh in a new experiment")
            tuner = None
        if tuner is not None:
            held = set(_read_json(storage, existing[-1] + ".jobs.json") or [])
            errored |= _fit(tuner, name, [j for j in jobs if j.key in held], storage, log)
        # left: jobs no experiment held yet, and jobs Tune finished whose output is missing or damaged
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
            verbose=0, callbacks=[stage_progress(name, _epochs(todo, params["settings"]), log)]),
    )
    _fit(tuner, name, todo, storage, log)


def _epochs(jobs, settings: dict) -> dict:
    """job key -> its epochs, for the progress line."""
    s = Settings(**settings)
    return {j.key: job_config(j, s).resolved_epochs() for j in jobs}


def _restorable(storage: Storage, experiment: str) -> bool:
    """Whether Tune saved the experiment's state and its grid's variant state. A driver stopped as the
    experiment began (a `ray job stop` a moment after the stage started) leaves tuner.pkl alone: Tune's
    restore then rebuilds the grid from an empty param space (it does not keep the space in tuner.pkl)
    and makes a trial with no job in its config. There is no checkpoint to lose: a new experiment runs."""
    names = {p.replace("\\", "/").rsplit("/", 1)[-1] for p in storage.files(experiment)}
    return any(n.startswith("experiment_state-") for n in names) and \
        any(n.startswith("basic-variant-state-") for n in names)


def _tune_filesystem(storage: Storage):
    """Tune's storage_filesystem: None for a local folder, else the storage's (S3, GCS, ...)."""
    return None if storage.local else storage.fs


def _fit(tuner, name, jobs, storage, log) -> set[str]:
    """Runs a Tuner over ``jobs``; returns the keys of errored trials; raises SweepInterrupted on
    Ctrl-C and StorageFull when trials failed for lack of space.

    A job that Tune finished but whose output is missing or damaged (a deleted or truncated model
    file, a damaged record) is not 'interrupted': the caller redoes it in a new experiment.
    """
    with SigintWatch() as ctrl_c:
        results = tuner.fit()
    errors = {r.config["job"]["key"]: r.error for r in results if r.error is not None and r.config}
    full = [k for k, e in errors.items() if is_no_space(e)]
    if full:
        raise StorageFull(f"storage: {NO_SPACE} in {storage.name} ({len(full)} trial(s) failed writing, e.g. "
                          f"{full[0]}); free space, then rerun with --resume to continue")
    if ctrl_c.seen:
        # Tune returns from fit() on Ctrl-C with its state saved; a trial it was running may come
        # back as an error of any kind (SystemExit, a dead actor) or even with status TERMINATED
        # (its cleanup stops it): stopped by the user, not failed or finished, and the sweep must
        # not go on to the next stage
        unfinished = [j.key for j in jobs if not storage.done(j)]
        raise SweepInterrupted(f"{name}: interrupted with {len(unfinished)} trial(s) unfinished; "
                               "rerun with --resume to continue")
    # without the watch's evidence (Tune also stops on SIGUSR1, which the watch does not see): a
    # trial ended by SystemExit, or one neither finished nor errored, was stopped, not failed
    finished = _terminated(results)
    exited = [k for k, e in errors.items() if "SystemExit" in str(e)]
    stopped = [j.key for j in jobs if not storage.done(j) and j.key not in errors and j.key not in finished]
    if exited or stopped:
        raise SweepInterrupted(f"{name}: interrupted with {len(exited) + len(stopped)} trial(s) unfinished; "
                               "rerun with --resume to continue")
    redo = [j.key for j in jobs if j.key in finished and not storage.done(j)]
    if redo:
        log(f"{name}: {len(redo)} trial(s) finished before but their results are missing or damaged; redoing them")
    log(f"{name}: {len(results) - len(errors) - len(redo)} trials finished, {len(errors)} failed")
    return set(errors)


class SigintWatch:
    """Tells whether a Ctrl-C (SIGINT) arrived during ``tuner.fit()``, and leaves the SIGINT handler
    as it found it.

    Tune's fit() installs its own SIGINT handler (ray/tune/tune.py, _setup_signal_catching): on the
    first SIGINT it stops the experiment, saves its state, puts the handler it found back, and
    returns normally; the trials it was running can come back as errors of any kind, so the
    results alone cannot tell an interrupted stage from a failed trial. When no SIGINT arrives,
    Tune leaves its handler installed after fit(), and a Ctrl-C in a later stage (the attacks)
    would only set the finished experiment's flag. This watch installs a handler of its own before
    fit(): if Tune put it back, a SIGINT arrived. Where Tune installs none (not the main thread,
    TUNE_DISABLE_SIGINT_HANDLER=1), the watch's handler is called itself and raises
    KeyboardInterrupt, Python's default.
    """

    def __init__(self):
        self.seen = False
        self._main = threading.current_thread() is threading.main_thread()
        self._tune_catches = self._main and not int(os.getenv("TUNE_DISABLE_SIGINT_HANDLER", "0"))
        self._before = None
        self._handler = self._on_sigint  # one object, compared by identity in __exit__

    def _on_sigint(self, sig, frame):
        self.seen = True
        raise KeyboardInterrupt

    def __enter__(self):
        if self._main:
            self._before = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._main:
            if self._tune_catches and signal.getsignal(signal.SIGINT) is self._handler:
                self.seen = True
            before = self._before if self._before is not None else signal.default_int_handler
            signal.signal(signal.SIGINT, before)  # None: a handler not set from Python
        return False


def _terminated(results) -> set[str]:
    """Keys of the trials Tune ran to the end (status TERMINATED) in a ResultGrid."""
    trials = getattr(getattr(results, "_experiment_analysis", None), "trials", None)
    if trials is None:  # not exposed by this Ray version: a record saying "done" is the evidence
        return {r.config["job"]["key"] for r in results if r.config and r.error is None and r.metrics.get("done")}
    return {t.config["job"]["key"] for t in trials if t.status == "TERMINATED" and t.config}


def _read_json(storage: Storage, path):
    """A bookkeeping file; a damaged one is reported and read as absent."""
    try:
        return storage.read_json(path)
    except Damaged as e:
        storage.report(f"{e}; ignored")
        return None


def _trial_name(trial) -> str:
    return trial.config["job"]["key"]


def _attack_stage(jobs, storage, settings, res, resources, data_refs, failed, log, ctrl_c: CtrlC) -> dict:
    import ray

    task = ray.remote(_attack_task).options(num_cpus=res["cpu"], num_gpus=res["gpu"],
                                            max_retries=resources.attack_retries)
    todo = []
    for j in jobs:
        problem = attack_problem(storage, j)
        if problem and not problem.startswith("missing"):
            log(f"attacks: {problem}; redoing it")
        if problem:
            todo.append(j)
    runnable = [j for j in todo if j.model_key not in failed]
    skipped = len(todo) - len(runnable)
    log(f"attacks: {len(jobs)} tasks, {len(jobs) - len(todo)} already written, {len(runnable)} to run"
        + (f", {skipped} skipped (their model failed)" if skipped else ""))
    pending = {task.remote(job_to_dict(j), settings.to_dict(), storage.root, data_refs[j.dataset]): j for j in runnable}
    done, errors = 0, {}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        ctrl_c.check()
        job = pending.pop(ready[0])
        try:
            ray.get(ready[0])
            done += 1
            log(f"attacks: {done}/{len(runnable)} written ({job.key}, {job.attack})")
        except (ray.exceptions.RayTaskError, ray.exceptions.WorkerCrashedError, ray.exceptions.RayError) as e:
            errors[f"{job.key}/{job.attack}"] = _cause(e)
            log(f"attacks: FAILED {job.key} ({job.attack}): {errors[f'{job.key}/{job.attack}']}")
    return {"planned": len(jobs), "written": done, "already": len(jobs) - len(todo), "failed": errors,
            "skipped": skipped}


