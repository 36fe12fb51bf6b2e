"""The sweep driver: connects to Ray, runs the stages, collects failures.

Pipeline (jobs.py names the jobs, work.py does their work; this module schedules it):
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

import os
import time


from ..errors import NO_SPACE, ConfigError, StorageFull, is_no_space
from ..jobs import Settings, job_config, plan
from ..lock import StorageLock
from ..schedule import longest_first
from ..storage import Damaged, Storage
from ..work import attack_problem
from .cluster import Resources, connect, gpu_node_cpus_per_gpu
from .interrupt import CtrlC, SigintWatch, SweepInterrupted
from .progress import _duration, quiet_tune, stage_progress
from .tasks import _attack_task, _load_data, _logits_task, job_to_dict, train_trial


class SweepFailed(RuntimeError):
    pass


def _refused(storage: Storage, existed: bool, err: Exception) -> Exception:
    """Marks an error raised before any work: run_sweep then removes a folder it created only
    for its lock (a local folder only when it is empty), so a refused sweep leaves nothing behind."""
    err.before_work = not existed
    return err


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


def _eta(left: int, finished: int, seconds: float) -> str:
    """The attack stage's ETA from the measured rate of finished tasks. The stage hands out its longest tasks
    first, so the rate so far is the slowest and the estimate errs long."""
    if not left:
        return "none left"
    return f"about {_duration(left * seconds / finished)} left" if finished else "ETA after the first task"


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
    done, errors, t0 = 0, {}, time.perf_counter()
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        ctrl_c.check()
        job = pending.pop(ready[0])
        try:
            ray.get(ready[0])
            done += 1
            log(f"attacks: {done}/{len(runnable)} written ({job.key}, {job.attack}); "
                f"{_eta(len(runnable) - done - len(errors), done + len(errors), time.perf_counter() - t0)}")
        except (ray.exceptions.RayTaskError, ray.exceptions.WorkerCrashedError, ray.exceptions.RayError) as e:
            errors[f"{job.key}/{job.attack}"] = _cause(e)
            log(f"attacks: FAILED {job.key} ({job.attack}): {errors[f'{job.key}/{job.attack}']}")
    return {"planned": len(jobs), "written": done, "already": len(jobs) - len(todo), "failed": errors,
            "skipped": skipped}
