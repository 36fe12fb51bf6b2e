"""Console output a person can read: one progress line per stage event instead of Tune's status tables."""
from __future__ import annotations

import logging
import os
import time


def quiet_tune() -> None:
    """Tune's own console output off in the driver: the experiment box and its TensorBoard hint (a path
    under /tmp/ray, not the sweep's TensorBoard folder), the status tables, the "Wrote the latest version"
    lines. The progress lines and the closing summary say what is happening and where results go; Tune's
    warnings and errors still show."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")    # the older reporter, which prints nothing at verbose=0
    logging.getLogger("ray.tune.tune").setLevel(logging.WARNING)


def quiet_trial() -> None:
    """In a trial's worker: Ray Train's "Checkpoint successfully created at: ..." line after every epoch's
    checkpoint off; the epoch lines the trial prints stay."""
    for name in ("ray.train._internal.storage", "ray.train.v2._internal.execution.storage"):
        logging.getLogger(name).setLevel(logging.WARNING)


def stage_progress(name: str, epochs: dict, log, every_s: float = 30.0):
    """A Tune callback that prints one progress line for a stage instead of Tune's status tables.

    The line comes when a trial starts, finishes or fails, and at most every ``every_s`` seconds as epochs come
    in. It gives counts, epochs done out of the stage's total, and an ETA from the measured rate:
    ``students: 12/60 done, 3 running, 0 failed; 410/1200 epochs; about 2h10m left``. epochs: job key -> the
    job's epochs. log None: print."""
    from ray.tune import Callback

    log = log or _print_line

    class StageProgress(Callback):
        def __init__(self):
            self.t0 = time.perf_counter()
            self.last = 0.0
            self.done, self.failed, self.running, self.epoch = set(), set(), set(), {}

        def __reduce__(self):
            # Tune pickles its callbacks with the experiment's state; the log function (print, or a caller's) need
            # not pickle. A restored experiment gets a fresh line printer: the counts start again from Tune's events
            return (stage_progress, (name, epochs, None, every_s))

        def _line(self, force=False):
            now = time.perf_counter()
            if not force and now - self.last < every_s:
                return
            self.last = now
            total = sum(epochs.values()) or 1
            did = sum(self.epoch.get(k, 0) for k in epochs)
            # epochs finished before this run (a resumed stage) do not count towards the rate
            rate = (did - self.start_epochs) / max(now - self.t0, 1e-9)
            eta = (total - did) / rate if rate > 0 else None
            log(f"{name}: {len(self.done)}/{len(epochs)} done, {len(self.running)} running, {len(self.failed)} failed; "
                f"{did}/{total} epochs; " + (f"about {_duration(eta)} left" if eta is not None else "ETA after the "
                                                                                                    "first epoch"))

        start_epochs = 0

        @staticmethod
        def _key(trial):
            return ((trial.config or {}).get("job") or {}).get("key")

        def on_trial_start(self, iteration, trials, trial, **info):
            self.running.add(self._key(trial))
            self._line(force=True)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.epoch[self._key(trial)] = int(result.get("epoch", 0))
            self._line()

        def on_trial_complete(self, iteration, trials, trial, **info):
            k = self._key(trial)
            self.running.discard(k)
            self.done.add(k)
            self.epoch[k] = epochs.get(k, self.epoch.get(k, 0))
            self._line(force=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            k = self._key(trial)
            self.running.discard(k)
            self.failed.add(k)
            self._line(force=True)

    return StageProgress()


def search_progress(name: str, n_trials: int, epochs: int, log, every_s: float = 30.0):
    """A Tune callback for the lambda / T search: one line when a trial starts or ends, and at most every
    ``every_s`` seconds as epochs come in, instead of Tune's status tables:
    ``lam-T-...: 3/10 trials ended (2 full length, 1 stopped early), 2 running, 0 failed; best full-length 91.2%
    (lam 0.83, T 7.2); at most about 5m left``. n_trials: the trials this run starts; epochs: a trial's full length. The ETA
    is an upper bound (every remaining trial run to full length, at the measured epoch rate): ASHA stops some
    early. log None: print."""
    from ray.tune import Callback

    log = log or _print_line

    class SearchProgress(Callback):
        def __init__(self):
            self.t0 = time.perf_counter()
            self.last = 0.0
            self.full, self.stopped, self.failed, self.running, self.epoch = set(), set(), set(), set(), {}
            self.best = None                     # (accuracy, lam, T)

        def __reduce__(self):   # as stage_progress: the log function need not pickle
            return (search_progress, (name, n_trials, epochs, None, every_s))

        def _line(self, force=False):
            now = time.perf_counter()
            if not force and now - self.last < every_s:
                return
            self.last = now
            ended = len(self.full) + len(self.stopped) + len(self.failed)
            did = sum(self.epoch.values())
            left = sum(epochs - self.epoch.get(k, 0) for k in self.running) + epochs * max(
                0, n_trials - ended - len(self.running))
            rate = did / max(now - self.t0, 1e-9)
            best = (f"best full-length {100 * self.best[0]:.1f}% (lam {self.best[1]:.2f}, T {self.best[2]:.2f})"
                    if self.best else "no result yet")
            eta = f"at most about {_duration(left / rate)} left" if rate > 0 else "ETA after the first epoch"
            log(f"{name}: {ended}/{n_trials} trials ended ({len(self.full)} full length, {len(self.stopped)} stopped "
                f"early), {len(self.running)} running, {len(self.failed)} failed; {best}; {eta}")

        def on_trial_start(self, iteration, trials, trial, **info):
            self.running.add(trial.trial_id)
            self._line(force=True)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.epoch[trial.trial_id] = int(result.get("epoch", 0))
            acc, cfg = result.get("test_accuracy"), trial.config or {}
            # the best among full-length trials, as the search's answer is
            if acc is not None and self.epoch[trial.trial_id] >= epochs and (self.best is None or acc > self.best[0]) and "lam" in cfg:
                self.best = (float(acc), float(cfg["lam"]), float(cfg["T"]))
            self._line()

        def on_trial_complete(self, iteration, trials, trial, **info):
            k = trial.trial_id
            self.running.discard(k)
            (self.full if self.epoch.get(k, 0) >= epochs else self.stopped).add(k)
            self._line(force=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            self.running.discard(trial.trial_id)
            self.failed.add(trial.trial_id)
            self._line(force=True)

    return SearchProgress()


def _print_line(line: str) -> None:
    print(line, flush=True)


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 90:
        return f"{s}s"
    m = s // 60
    if m < 10:
        return f"{m}m{s % 60:02d}s"
    return f"{m}m" if m < 90 else f"{m // 60}h{m % 60:02d}m"
