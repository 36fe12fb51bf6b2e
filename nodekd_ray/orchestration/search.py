"""The lambda / T search: Optuna TPE through Ray Tune's OptunaSearch, with ASHA early stopping.

Full-length schedules: ASHA's max_t is the students' epochs (200 on CIFAR10), its grace period a
stated fraction of them (a quarter by default: no trial is judged on its near-chance first
epochs), and the time unit is the student's own epoch counter, which survives a restore from a
checkpoint. A trial that ASHA stops early reaches the Optuna study as PRUNED with its last value,
not as COMPLETE, so TPE does not mistake a truncated run for a finished one and the best
(lam, T) is chosen among full-length trials only.
"""
from __future__ import annotations

import math
import os

from ..errors import ConfigError
from ..lock import StorageLock
from ..jobs import Settings, StudentJob, TeacherJob, student_config
from ..presets import SweepSpec
from ..storage import Storage
from .progress import quiet_tune, search_progress
from .cluster import Resources
from .driver import SweepFailed, _data_ref, _tune_filesystem, logit_tables, run_sweep
from .tasks import train_trial

GRACE_FRACTION = 0.25     # ASHA grace period, as a fraction of the trial's epochs
REDUCTION_FACTOR = 2      # ASHA: keep the top 1/2 at each rung


def search_key(base: dict, lam: float, T: float) -> dict:
    """The student job of one proposed (lam, T), keyed by its rounded values."""
    job = dict(base, T=round(float(T), 3), lam=round(float(lam), 3))
    job["key"] = StudentJob(**{k: v for k, v in job.items() if k not in ("type", "key")}).key
    return job


def search_trial(config, *, base, resume_from=None, **params):
    """One Optuna-proposed (lam, T): a KD student keyed by its rounded values. ``resume_from``: job key ->
    the last checkpoint of an interrupted earlier run of the same (lam, T) (reopen_interrupted)."""
    job = search_key(base, config["lam"], config["T"])
    train_trial({"job": job}, resume_path=(resume_from or {}).get(job["key"]), **params)


def reopen_interrupted(study, log=print) -> list[dict]:
    """Trials that an earlier run left RUNNING in the journal (its driver was killed; this run holds the
    folder's lock, so none of them runs now): each is closed as FAIL and its (lam, T) queued again, so
    the next sample Optuna proposes is that one, and it resumes from its last checkpoint
    (interrupted_checkpoints). Returns the reopened trials' params."""
    import optuna

    running = [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    for t in running:
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        if t.params:
            study.enqueue_trial(t.params, user_attrs={"reopens_trial": t.number})
    if running:
        log(f"optuna study {study.study_name!r}: {len(running)} trial(s) interrupted by an earlier run "
            f"(numbers {', '.join(str(t.number) for t in running)}) queued again with their (lam, T)")
    return [t.params for t in running if t.params]


def interrupted_checkpoints(storage: Storage, study_name: str, base: dict, reopened: list[dict]) -> dict:
    """Job key -> the latest Tune checkpoint (state.pt) of each reopened (lam, T) in this study's earlier
    Tune experiments (STORAGE/tune/STUDY-N/TRIAL/checkpoint_K/state.pt, the trial's params.json beside).
    Only reopened trials: a finished one's last checkpoint is its end, with nothing left to train."""
    wanted = {search_key(base, p["lam"], p["T"])["key"] for p in reopened if "lam" in p and "T" in p}
    if not wanted:
        return {}
    tune_dir = storage.path("tune")
    if not storage.isdir(tune_dir):
        return {}
    best: dict[str, tuple[int, str]] = {}
    for path in storage.files(tune_dir, recursive=True):   # pyarrow's paths: '/'-separated
        parts = path.split("/")
        if (parts[-1] != "state.pt" or len(parts) < 4 or not parts[-2].startswith("checkpoint_")
                or not parts[-4].startswith(f"{study_name}-")):
            continue
        params = storage.read_json("/".join(parts[:-2] + ["params.json"]))
        if not params or "lam" not in params or "T" not in params:
            continue
        key = search_key(base, params["lam"], params["T"])["key"]
        if key not in wanted:
            continue
        index = int(parts[-2].split("_")[-1])
        if key not in best or index > best[key][0]:
            best[key] = (index, path)
    return {k: v[1] for k, v in best.items()}


def grace_period(epochs: int, grace_fraction: float = GRACE_FRACTION) -> int:
    """ASHA's grace period: ceil(fraction x epochs), at least 1."""
    if not 0 < grace_fraction <= 1:
        raise ConfigError("grace_fraction", f"must be in (0, 1], got {grace_fraction:g}")
    return max(1, math.ceil(grace_fraction * epochs))


def search_scheduler(epochs: int, grace_fraction: float = GRACE_FRACTION):
    """ASHA over a trial's whole schedule: max_t = epochs, rungs from the grace period on."""
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period=grace_period(epochs, grace_fraction),
                         reduction_factor=REDUCTION_FACTOR)


def pruning_searcher(full_length: int, **kw):
    """Ray's OptunaSearch, except that a trial ending before ``full_length`` epochs without an
    error (stopped by ASHA) is told to Optuna as PRUNED, with its last value as an intermediate
    value at the epoch where it stopped. Ray's own class reports it as COMPLETE."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    class PruningOptunaSearch(OptunaSearch):
        def on_trial_complete(self, trial_id, result=None, error=False):
            epoch = (result or {}).get("epoch")
            if error or epoch is None or epoch >= full_length or trial_id in self._completed_trials:
                return super().on_trial_complete(trial_id, result=result, error=error)
            ot_trial = self._ot_trials[trial_id]
            value = result.get(self.metric)
            if value is not None:
                ot_trial.report(float(value), step=int(epoch))
            self._ot_study.tell(ot_trial, state=optuna.trial.TrialState.PRUNED)
            self._completed_trials.add(trial_id)

    return PruningOptunaSearch(**kw)


def run_search(*, dataset: str, teacher: str, t1: float, logits_mode: str, num_samples: int, settings: Settings,
               storage_root: str, resources: Resources, lam_range=(0.0, 1.0), T_range=(1.0, 30.0),
               grace_fraction: float = GRACE_FRACTION, address=None, num_cpus=None, log=print,
               dry_run: bool = False) -> dict:
    """Optuna TPE over (lam, T) through Ray Tune's OptunaSearch, with ASHA early stopping.

    The Optuna study lives in STORAGE/optuna.journal (a file journal), so a rerun continues it:
    TPE sees every earlier trial (finished or pruned) and only the missing samples run. Returns
    the best (lam, T) among full-length trials. dry_run: check the settings and the storage, log the plan,
    return it ({"dry_run": True, ...}) and start nothing.
    """
    if num_samples < 1:
        raise ConfigError("num_samples", f"must be >= 1, got {num_samples}")
    if not (0 <= lam_range[0] < lam_range[1] <= 1):
        raise ConfigError("lam_range", f"need 0 <= low < high <= 1, got {lam_range}")
    if not (0 < T_range[0] < T_range[1] < float("inf")):
        raise ConfigError("T_range", f"need 0 < low < high < inf, got {T_range}")
    probe = StudentJob(dataset, float(t1), 0, teacher, 10.0, 0.9, logits_mode)
    epochs = student_config(probe, settings).resolved_epochs()
    storage = Storage(storage_root)
    storage.check_writable()
    if dry_run:
        grace = grace_period(epochs, grace_fraction)
        journal = storage.path("optuna.journal")
        plan = {"dry_run": True, "teacher": teacher, "dataset": dataset, "t1": t1, "num_samples": num_samples,
                "epochs": epochs, "grace_period": grace, "lam_range": tuple(lam_range), "T_range": tuple(T_range),
                "journal": storage.url(journal), "journal_exists": storage.exists(journal)}
        log(f"plan: lam/T search of {teacher} on {dataset}, NODE({t1:g}) students of {epochs} epochs, "
            f"{num_samples} trials in all (earlier runs' included: "
            f"{'the study in ' + plan['journal'] + ' continues' if plan['journal_exists'] else 'a new study'}), "
            f"lam in [{lam_range[0]:g}, {lam_range[1]:g}], T in [{T_range[0]:g}, {T_range[1]:g}], ASHA from epoch "
            f"{grace} (reduction factor {REDUCTION_FACTOR}); the teacher first unless done. --dry-run: nothing "
            "is started")
        return plan
    scheduler = search_scheduler(epochs, grace_fraction)
    with StorageLock(storage, f"lam/T search of {teacher} on {dataset}", log=log):
        return _search(dataset, teacher, t1, logits_mode, num_samples, settings, storage_root, resources, lam_range,
                       T_range, grace_fraction, address, num_cpus, log, probe, epochs, scheduler)


def _search(dataset, teacher, t1, logits_mode, num_samples, settings, storage_root, resources, lam_range, T_range,
            grace_fraction, address, num_cpus, log, probe, epochs, scheduler) -> dict:
    """run_search's work, inside the storage folder's lock."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from ray import tune

    teacher_spec = SweepSpec(f"search-{dataset}", datasets=(dataset,), teachers=(teacher,))
    summary = run_sweep([teacher_spec], settings, storage_root, resources=resources, address=address,
                        num_cpus=num_cpus, log=log, resume=True)
    storage = Storage(storage_root)
    tj = TeacherJob(dataset, teacher)
    if not storage.done(tj):
        raise SweepFailed(f"teacher {tj.key} did not finish: {summary['failed'].get(tj.key)}")
    res = summary["request"]
    data_ref = _data_ref(dataset, settings)
    table_refs, blocked = logit_tables([probe], settings, storage, res, {dataset: data_ref}, log)
    if blocked:
        raise SweepFailed(blocked[probe.key])
    study_name = f"lam-T-{dataset}-{teacher}-t{t1:g}-{logits_mode}"
    sync = _JournalSync(storage)
    journal = JournalStorage(JournalFileBackend(sync.local))
    study = optuna.create_study(study_name=study_name, storage=journal, direction="maximize", load_if_exists=True)
    states = optuna.trial.TrialState
    reopened = reopen_interrupted(study, log)
    finished = [t for t in study.trials if t.state in (states.COMPLETE, states.PRUNED)]
    remaining = max(0, num_samples - len(finished))
    log(f"optuna study {study_name!r}: {len(finished)} finished trials in {sync.url}, {remaining} to run; "
        f"ASHA over {epochs} epochs, grace period {grace_period(epochs, grace_fraction)} "
        f"({grace_fraction:g} of the epochs), reduction factor {REDUCTION_FACTOR}")
    if remaining:
        quiet_tune()
        base = {"type": "StudentJob", "dataset": dataset, "t1": float(t1), "seed": 0, "teacher": teacher,
                "T": None, "lam": None, "logits_mode": logits_mode}
        resume_from = interrupted_checkpoints(storage, study_name, base, reopened)
        if resume_from:
            log(f"{len(resume_from)} (lam, T) with a checkpoint from an earlier run: an interrupted one resumes there")
        trainable = tune.with_resources(
            tune.with_parameters(search_trial, base=base, resume_from=resume_from, data_refs={dataset: data_ref},
                                 table_refs=table_refs, settings=settings.to_dict(), storage_root=storage.root), res)
        # seeded by the study's size: a rerun seeded like the first run drew the first run's first (lam, T) again
        searcher = pruning_searcher(epochs, metric="test_accuracy", mode="max", study_name=study_name,
                                    storage=journal, seed=len(study.trials))
        tuner = tune.Tuner(
            trainable,
            param_space={"lam": tune.uniform(*lam_range), "T": tune.loguniform(*T_range)},
            tune_config=tune.TuneConfig(search_alg=searcher, num_samples=remaining, metric="test_accuracy", mode="max",
                                        scheduler=scheduler, max_concurrent_trials=resources.max_concurrent or None),
            run_config=tune.RunConfig(name=f"{study_name}-{len(finished)}", storage_path=storage.path("tune"),
                                      storage_filesystem=_tune_filesystem(storage),
                                      failure_config=tune.FailureConfig(max_failures=resources.max_failures),
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1), verbose=0,
                                      callbacks=[sync.callback(), search_progress(study_name, remaining, epochs,
                                                                                  log)]),
        )
        try:
            tuner.fit()
        finally:
            sync.upload()
    study = optuna.load_study(study_name=study_name, storage=journal)
    done = [t for t in study.trials if t.state == states.COMPLETE]
    pruned = [t for t in study.trials if t.state == states.PRUNED]
    if not done:
        raise SweepFailed(f"no search trial ran its full {epochs} epochs ({len(pruned)} stopped early)")
    best = max(done, key=lambda t: t.value)
    out = {"study": study_name, "trials": len(done), "pruned": len(pruned), "epochs": epochs,
           "best_lam": best.params["lam"], "best_T": best.params["T"], "best_test_accuracy": best.value,
           "journal": sync.url, "result": storage.url(storage.path(f"{study_name}.json")),
           "storage": storage.name, "tensorboard": storage.url(storage.path("tensorboard"))}
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
