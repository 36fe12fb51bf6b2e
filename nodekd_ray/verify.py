"""``nodekd verify STORAGE``: what a sweep folder holds, checked the way the sweep reads it.

Every artifact is checked as its reader checks it (storage.py, work.py): trial records parse;
a finished job's model matches the size and SHA-256 recorded when it was written (older records:
it loads as the expected architecture); a logits table matches its sidecar and the teacher that
is there now; an attack file opens as Parquet with the attack schema and one row per eps, made
from the model file that is there now. What the sweeps that used the folder set out to make
(plans/*.json, written when a sweep starts) and has no output yet is listed as missing.

- complete: usable results;
- missing: planned work with no output yet (the sweep has not got there, or the job failed);
- damaged: a file that exists but cannot be used, or a record that says done whose model is
  gone. A sweep rerun with ``--resume`` redoes each of them; ``nodekd report`` leaves them out.

Plain pyarrow and PyTorch; no Ray.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

from .errors import ConfigError
from .storage import Damaged, Storage
from .jobs import AttackJob
from .work import _attack_table_problem, attack_problem, logits_problem, record_arch


@dataclass
class VerifyReport:
    storage: str
    complete: dict = field(default_factory=dict)     # what -> count
    missing: list = field(default_factory=list)
    damaged: list = field(default_factory=list)
    unfinished: list = field(default_factory=list)   # records of failed / interrupted / running jobs
    mixed: list = field(default_factory=list)        # table cells whose rows were computed differently
    lock: str | None = None

    def add(self, what: str) -> None:
        self.complete[what] = self.complete.get(what, 0) + 1

    def lines(self, quiet: bool = False) -> list[str]:
        out = [f"verify {self.storage}"]
        if self.lock:
            out.append(f"lock: {self.lock}")
        done = ", ".join(f"{n} {what}" for what, n in self.complete.items()) or "nothing"
        out.append(f"complete: {done}")
        out.append(f"missing: {len(self.missing)}, damaged: {len(self.damaged)}, unfinished: {len(self.unfinished)}")
        out += [f"DAMAGED {d}" for d in self.damaged]
        out += [f"MIXED {m}" for m in self.mixed]
        if not quiet:
            out += [f"missing {m}" for m in self.missing]
            out += [f"unfinished {u}" for u in self.unfinished]
        if self.damaged:
            out.append("rerun the sweep with --resume to redo the damaged items; `nodekd report` leaves them out")
        return out


def verify(root: str) -> VerifyReport:
    st = Storage(root)
    st.check_reachable()
    if not st.isdir(st.base):
        raise ConfigError("results_dir", f"no such folder: {st.name}")
    st.warn = lambda line: None
    rep = VerifyReport(st.name)
    _lock(st, rep)
    try:
        st.read_json(st.path("settings.json"))
    except Damaged as e:
        rep.damaged.append(str(e))

    planned_models, planned_attacks = set(), {}
    for path in st.files(st.path("plans")):
        if not path.endswith(".json") or path.replace("\\", "/").rsplit("/", 1)[-1].startswith("."):
            continue
        try:
            plan = st.read_json(path) or {}
            planned_models |= set(plan.get("models", []))
            for d in plan.get("attacks", []):
                job = AttackJob(d["model_key"], d["dataset"], d["attack"], tuple(d["eps_255"]), d.get("source", ""))
                planned_attacks[job.key + "/" + job.attack] = job
        except (Damaged, KeyError, TypeError, AttributeError) as e:
            rep.damaged.append(str(e) if isinstance(e, Damaged) else f"damaged plan {st.url(path)}: {e}")

    records = {}
    keys = {p.replace("\\", "/").rsplit("/", 1)[-1][:-5] for p in st.files(st.path("records"))
            if p.endswith(".json") and not p.replace("\\", "/").rsplit("/", 1)[-1].startswith(".")}
    for key in sorted(keys | planned_models):
        rec, problem = st.record_state(key)
        if problem:
            rep.damaged.append(problem)
            continue
        if rec is None:
            rep.missing.append(f"model {key}: not trained yet")
            continue
        records[key] = rec
        if rec.get("status") != "done":
            rep.unfinished.append(f"{key}: {rec.get('status')}" + (f": {rec['error']}" if rec.get("error") else ""))
            continue
        arch = record_arch(rec)
        problem = st.model_problem(key, rec, arch)
        if problem:
            rep.damaged.append(problem + (" (its record says done)" if problem.startswith("missing") else ""))
        else:
            rep.add("models")

    for path in st.files(st.path("logits")):
        name = path.replace("\\", "/").rsplit("/", 1)[-1]
        if not name.endswith(".npy") or name.startswith(".") or "-" not in name:
            continue
        teacher_key, mode = name[:-4].rsplit("-", 1)
        problem = logits_problem(st, SimpleNamespace(key=teacher_key), mode, records.get(teacher_key, {}),
                                 st.read_bytes(path) or b"")
        if problem:
            rep.damaged.append(problem)
        else:
            rep.add("logit tables")

    seen = set()
    for job in planned_attacks.values():
        path = st.attack_file(job)
        seen.add(path)
        problem = attack_problem(st, job, records.get(job.model_key, {}))
        if problem is None:
            rep.add("attack files")
        elif problem.startswith("missing"):
            rep.missing.append(f"attack {job.key} ({job.attack}): not run yet")
        else:
            rep.damaged.append(problem)
    for path in st.files(st.path("results", "attacks"), recursive=True):
        name = path.replace("\\", "/").rsplit("/", 1)[-1]
        if path in seen or not name.endswith(".parquet") or name.startswith("."):
            continue
        table, problem = _attack_table_problem(st.url(path), st.read_bytes(path) or b"", chunk=name[:-len(".parquet")])
        if problem:
            rep.damaged.append(problem)
        else:
            rep.add("attack files")
    from .audit import mixed_cells
    from .work import read_attacks

    for (ds, attack, model, e), how in sorted(mixed_cells(read_attacks(st).to_pylist()).items()):
        rep.mixed.append(f"{ds} {attack} {model} eps {e:g}/255: its seeds' rows were computed differently "
                         f"({' | '.join(how)}); `nodekd report` marks the cell")
    return rep


def _lock(st: Storage, rep: VerifyReport) -> None:
    from .lock import StorageLock

    lk = StorageLock(st, "verify")
    h = lk.holder()
    if h is None:
        return
    why = lk.dead_reason(h)
    rep.lock = (f"held by {lk.describe(h)}: a run is writing here now" if why is None
                else f"left by a dead run ({why}); the next sweep takes it over")
