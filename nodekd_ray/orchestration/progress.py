"""Console output a person can read: one progress line per stage event instead of Tune's status tables."""
from __future__ import annotations

import time


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
