"""Each job's work: a teacher's or student's training (checkpointed, recorded, resumable), a teacher's logit
table (computed once, cached), and an attack chunk (one Parquet file); model, logits and attack files verified when
read. Plain PyTorch and pyarrow: the orchestration layer calls these from Ray Tune trials and Ray tasks."""
from __future__ import annotations

import hashlib
import io
import json
import os
import time

import numpy as np
import pyarrow as pa

from .attacks import CROSS_TOLERANCE, attack_sweep
from .data import ImageSet
from .devices import describe_device, placement_device
from .errors import ConfigError
from .faults import InjectedFault, die_mid_write, fault
from .jobs import AttackJob, Settings, StudentJob, TeacherJob, student_config, teacher_config
from .kd import compute_logit_table
from .checkpoints import checkpoint_state, load_checkpoint
from .models import ODESolveError
from .results import _LATER_FIELDS, ATTACK_FILE_SCHEMA, ATTACK_SCHEMA
from .storage import Damaged, Storage
from .train import train_student, train_teacher

def _limited(data: tuple[ImageSet, ImageSet], cfg) -> tuple[ImageSet, ImageSet]:
    return data[0].take(cfg.limit_train), data[1].take(cfg.limit_test)


def logit_table(teacher_job: TeacherJob, mode: str, settings: Settings, storage: Storage,
                data: tuple[ImageSet, ImageSet], *, device="auto", held=None) -> np.ndarray:
    """The teacher's logit table over the students' training set, computed once and cached.

    Its .json sidecar, written after the table, says how many teacher forwards made it, on which
    device, holding which GPUs (``held``: the scheduler's assignment; it decides the device, see
    devices.py), the table's SHA-256 and the SHA-256 of the teacher model it came from. A cached
    table costs none; one that does not check out (see logits_problem: damaged, or made by a
    teacher that has since been retrained) is reported in one line and computed again.
    """
    path = storage.logits(teacher_job.key, mode)
    device = placement_device(held) if held is not None else device
    probe = student_config(StudentJob(teacher_job.dataset, 1.0, teacher_job.seed, teacher_job.arch, 10.0, 0.9, mode),
                           settings, device=device)
    train, _ = _limited(data, probe)
    teacher_rec = storage.read_record(teacher_job.key) or {}
    cached, problem = _cached_logits(storage, teacher_job, mode, teacher_rec, len(train), train.num_classes)
    if cached is not None:
        return cached
    if problem:
        storage.report(f"{problem}; computing it again")
    teacher, _ = load_model(storage, teacher_job.key, expect_arch=teacher_job.arch, rec=teacher_rec)
    if fault("fail_logits", teacher_job.key, storage):
        raise InjectedFault(f"injected failure in the logits of {teacher_job.key}")
    pad, _ = probe.augment()
    t0 = time.perf_counter()
    table = compute_logit_table(teacher, train, mode=mode, crop_padding=pad, device=probe.torch_device())
    seconds = time.perf_counter() - t0
    buf = io.BytesIO()
    np.save(buf, table)
    storage.write_bytes(path, buf.getvalue())
    views = table.shape[1] if table.ndim == 3 else 1
    storage.write_json({"teacher": teacher_job.key, "mode": mode, "shape": list(table.shape),
                        "teacher_forward_images": len(train) * views, "seconds": seconds,
                        "sha256": hashlib.sha256(buf.getvalue()).hexdigest(),
                        "teacher_sha256": teacher_rec.get("model_sha256"),
                        "device": describe_device(probe.torch_device()), **_held(held)},
                       storage.logits(teacher_job.key, mode, "json"))
    return table


def _cached_logits(storage: Storage, teacher_job, mode, teacher_rec, n, num_classes):
    """(table, None) for a cached table that checks out; (None, why) or (None, None) when none is cached."""
    path = storage.logits(teacher_job.key, mode)
    data = storage.read_bytes(path)
    if data is None:
        return None, None
    problem = logits_problem(storage, teacher_job, mode, teacher_rec, data, n, num_classes)
    if problem:
        return None, problem
    return np.load(io.BytesIO(data)), None


def logits_problem(storage: Storage, teacher_job, mode, teacher_rec, data: bytes, n=None, num_classes=None):
    """Why a cached logits table cannot be used, or None. Checks the sidecar (written last), the
    table's SHA-256, shape and values, and that it came from the teacher model that is there now."""
    path = storage.logits(teacher_job.key, mode)
    where = storage.url(path)
    try:
        side = storage.read_json(storage.logits(teacher_job.key, mode, "json"))
    except Exception as e:  # noqa: BLE001 - Damaged
        return f"{e} (sidecar of {where})"
    if not isinstance(side, dict):
        return str(Damaged("logits", where, "its .json sidecar is missing (written last: the table may be partial)"))
    if side.get("sha256") and hashlib.sha256(data).hexdigest() != side["sha256"]:
        return str(Damaged("logits", where, f"{len(data)} bytes whose SHA-256 differs from the one written"))
    try:
        table = np.load(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001 - truncated, not a .npy
        return str(Damaged("logits", where, f"not a readable .npy: {type(e).__name__}"))
    ok = (table.ndim in (2, 3) and list(table.shape) == list(side.get("shape", table.shape))
          and (n is None or table.shape[0] == n) and (num_classes is None or table.shape[-1] == num_classes))
    if not ok:
        return str(Damaged("logits", where, f"shape {list(table.shape)}, expected ({n}, ..., {num_classes})"))
    if not np.isfinite(table).all():
        return str(Damaged("logits", where, "holds NaN or inf"))
    made_by, now = side.get("teacher_sha256"), teacher_rec.get("model_sha256")
    if made_by and now and made_by != now:
        return str(Damaged("logits", where, f"made by an earlier {teacher_job.key} (the teacher was retrained since)"))
    return None


def load_model(storage: Storage, key: str, *, expect_arch=None, rec: dict | None = None):
    """(model, checkpoint dict) of a finished job, from any storage. With the job's record, the
    file must be the one that was written (size and SHA-256); either way it must load as
    ``expect_arch`` with fitting weights. A bad file is a one-line ConfigError("checkpoint", ...)."""
    path = storage.model(key)
    data = storage.read_bytes(path)
    if data is None:
        raise ConfigError("checkpoint", f"no such file: {storage.url(path)}")
    if rec and rec.get("model_sha256") and hashlib.sha256(data).hexdigest() != rec["model_sha256"]:
        raise ConfigError("checkpoint", f"damaged model {storage.url(path)}: {len(data)} bytes whose SHA-256 differs "
                                        "from the one recorded when it was written; rerun the sweep to retrain it")
    return load_checkpoint(io.BytesIO(data), name=storage.url(path), expect_arch=expect_arch)


def save_model(storage: Storage, key: str, model, ckpt: dict) -> dict:
    """Writes the checkpoint atomically; returns its size and SHA-256 for the job's record."""
    import torch

    buf = io.BytesIO()
    torch.save(checkpoint_state(model, **ckpt), buf)
    data = buf.getvalue()
    storage.write_bytes(storage.model(key), data)
    return {"model_bytes": len(data), "model_sha256": hashlib.sha256(data).hexdigest()}


def record_arch(rec: dict) -> str:
    """The architecture a job's record says its model file must hold."""
    return rec.get("model") if rec.get("kind") == "teacher" else "node"


def expected_arch(job) -> str:
    return job.arch if isinstance(job, TeacherJob) else "node"


class _TensorBoardDir:
    """Where a trial's TensorBoard files go: the storage folder itself when it is local; else a
    local staging folder, uploaded after every epoch (event files are appended to in place)."""

    def __init__(self, storage: Storage, key: str):
        self.storage, self.remote = storage, storage.tensorboard(key)
        self.local = self.remote if storage.local else storage.staging("tensorboard", key)
        self.sent: dict[str, int] = {}

    def sync(self) -> None:
        if not self.storage.local and os.path.isdir(self.local):
            self.storage.upload_tree(self.local, self.remote, self.sent)


def _base_record(job, cfg) -> dict:
    d = {"key": job.key, "kind": job.kind, "dataset": job.dataset, "seed": job.seed,
         "config": json.loads(json.dumps(cfg.to_dict(), default=str))}
    if isinstance(job, TeacherJob):
        d.update(model=job.arch)
    else:
        d.update(model="node", t1=job.t1, teacher=job.teacher, T=job.T, lam=job.lam, logits_mode=job.logits_mode)
    return d


def _held(held) -> dict:
    return {} if held is None else {"held_gpus": [str(g) for g in held]}


def run_training(job, settings: Settings, storage: Storage, data, *, table=None, resume: dict | None = None,
                 report=None, device="auto", held=None, log=None) -> dict:
    """Trains one teacher or student job to completion; the body of a Tune trial.

    resume: a state dict from a previous epoch (the trial's checkpoint). report(metrics, state)
    is called after every epoch. The record in records/{key}.json tracks attempts, the epoch each
    attempt started from, the history and, at the end, status "done" (with the model saved) or
    "failed" with the reason. An ODE solve failure is deterministic: later attempts fail at once.
    held: the GPUs the scheduler assigned to this job (None: not scheduled; ``device`` as given).
    The record stores them and the device the job actually computed on.
    """
    is_teacher = isinstance(job, TeacherJob)
    tb = _TensorBoardDir(storage, job.key)
    rec = storage.read_record(job.key) or {}
    if rec.get("status") == "failed" and rec.get("deterministic"):
        raise ODESolveError(f"{job.key} failed before (not retried): {rec.get('error')}")
    try:
        device = placement_device(held) if held is not None else device
    except ConfigError as e:  # holds a GPU it cannot use: say so in the record, never fall back to the CPU
        storage.write_record(job.key, {**rec, "key": job.key, "kind": job.kind, "dataset": job.dataset,
                                       "seed": job.seed, "status": "failed", **_held(held),
                                       "error": str(e)})
        raise
    cfg = (teacher_config if is_teacher else student_config)(job, settings, device=device, log_dir=tb.local)
    start = int(resume["epoch"]) if resume else 0
    rec = {**_base_record(job, cfg), "status": "running", "attempts": rec.get("attempts", 0) + 1,
           "started_from_epoch": rec.get("started_from_epoch", []) + [start], "history": rec.get("history", []),
           "device": describe_device(cfg.torch_device()), **_held(held)}
    storage.write_record(job.key, rec)

    def on_epoch(metrics, state):
        if not is_teacher:
            metrics = {**metrics, "teacher_forwards": soft_forwards(), "teacher_checkpoint_loads": teacher_loads}
        rec["history"] = state["history"]
        storage.write_record(job.key, rec)
        tb.sync()
        if report is not None:
            report(metrics, state)
        if fault("raise_in_training", job.key, storage, epoch=metrics["epoch"]):
            raise InjectedFault(f"injected failure in {job.key} after epoch {metrics['epoch']}")
        if fault("ode_nan", job.key, storage, epoch=metrics["epoch"]):
            for t in state["model"].values():   # shares storage with the live model
                if t.is_floating_point():
                    t.fill_(float("nan"))

    fit_kw = dict(resume=resume, on_epoch=on_epoch, progress=False, log=log)
    teacher_loads = 0
    holder = {}

    def soft_forwards():
        return holder["soft"].teacher_forwards if holder.get("soft") is not None else 0

    try:
        train, test = _limited(data, cfg)
        if is_teacher:
            model, history, ckpt = train_teacher(cfg, data=(train, test), **fit_kw)
        else:
            teacher = None
            if job.kd and job.logits_mode == "online":
                teacher, _ = load_model(storage, job.teacher_job.key, expect_arch=job.teacher,
                                        rec=storage.read_record(job.teacher_job.key))
                teacher_loads = 1
            model, history, ckpt = train_student(cfg, teacher=teacher, table=table, data=(train, test),
                                                 soft_out=holder, **fit_kw)
    except ODESolveError as e:
        storage.write_record(job.key, {**rec, "status": "failed", "deterministic": True, "error": f"ODESolveError: {e}"})
        raise
    except BaseException as e:
        try:
            storage.write_record(job.key, {**rec, "status": "interrupted", "error": f"{type(e).__name__}: {e}"})
        except OSError:  # a full disk: the trial's own error says so
            pass
        raise
    final = dict(history[-1])
    if not is_teacher:
        final.update(teacher_forwards=ckpt["meta"]["teacher_forwards"], teacher_checkpoint_loads=teacher_loads)
    written = save_model(storage, job.key, model, ckpt)
    _hparams(tb.local, rec, final)
    tb.sync()
    storage.write_record(job.key, {**rec, "status": "done", "history": history, "final": final,
                                   "test_accuracy": final["test_accuracy"],
                                   "eval_computation": cfg.eval_computation, "error": None, **written})
    return final


def _hparams(log_dir: str, rec: dict, final: dict) -> None:
    from torch.utils.tensorboard import SummaryWriter

    hp = {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
          for k, v in rec.items() if k in ("kind", "dataset", "seed", "model", "t1", "teacher", "T", "lam", "logits_mode")}
    with SummaryWriter(log_dir) as w:
        w.add_hparams(hp, {f"hparam/{k}": float(final[k]) for k in ("test_accuracy", "nfe_forward", "loss")},
                      run_name="hparams")


# ----------------------------------------------------------------------------- attacks

def run_attack(job: AttackJob, settings: Settings, storage: Storage, test: ImageSet, *, device="auto",
               held=None, seed: int = 0) -> str:
    """Attacks one model at a chunk of eps values and writes one Parquet file atomically.

    held: the GPUs the scheduler assigned to this task (None: not scheduled; ``device`` as given).
    """
    import torch

    t0 = time.perf_counter()
    out = storage.attack_file(job)
    rec = storage.read_record(job.model_key) or {}
    if held is not None:
        device = placement_device(held)
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    # a ResNet where a NODE belongs is refused
    model, _ = load_model(storage, job.model_key, expect_arch=record_arch(rec), rec=rec)
    source, source_name = None, ""
    if job.source:
        src = storage.read_record(job.source) or {}
        source, _ = load_model(storage, job.source, expect_arch=record_arch(src), rec=src)
        source_name = job.source
    audit = settings.audit_config()
    if job.attack == "pgd-rk4":
        source_name = f"rk4 x {audit.rk4_steps}"
    elif job.attack in CROSS_TOLERANCE:
        source_name = f"rtol {CROSS_TOLERANCE[job.attack]:g}"
    test = test.take(settings.attack_images)
    # PGD's random start is seeded by the chunk's first eps, so a rerun of a chunk repeats it exactly
    res = attack_sweep(model, test.images, test.labels, attack=job.attack, eps_list=[e / 255 for e in job.eps_255],
                       batch_size=settings.attack_batch_size, seed=seed + int(job.eps_255[0] * 1000), device=dev,
                       audit=audit, source=source, computation=settings.eval_computation)
    task_seconds = time.perf_counter() - t0
    rows = []
    for e255 in job.eps_255:
        m = np.isclose(res.eps, e255 / 255)
        n = int(m.sum())
        plan = res.plans[e255 / 255]
        rows.append({
            "model_key": job.model_key, "kind": rec.get("kind"), "model": rec.get("model"),
            "teacher": rec.get("teacher"), "T": rec.get("T"), "lam": rec.get("lam"), "t1": rec.get("t1"),
            "logits_mode": rec.get("logits_mode"), "seed": int(rec.get("seed", 0)),
            "eps": e255 / 255, "eps_255": float(e255), "steps": int(plan["steps"]), "n_images": n,
            "n_clean_correct": int(res.clean_correct[m].sum()), "n_adv_correct": int(res.adv_correct[m].sum()),
            "clean_accuracy": float(res.clean_correct[m].mean()), "robust_accuracy": float(res.adv_correct[m].mean()),
            "nfe_per_image": float(res.nfe[m].mean()), "seconds": float(res.seconds[e255 / 255]),
            "task_seconds": task_seconds, "chunk": job.key, "device": describe_device(dev),
            "held_gpus": ",".join(str(g) for g in held or ()), "model_sha256": rec.get("model_sha256"),
            "restarts": int(plan["restarts"]), "alpha_255": float(plan["alpha"] * 255),
            "solver": res.solver.get("solver", ""), "rtol": res.solver.get("rtol"), "atol": res.solver.get("atol"),
            "time_input": res.solver.get("time_input", ""), "source": source_name,
            "top_class_fraction": res.top_class_fraction, "num_classes": int(test.num_classes),
            **res.computation,
        })
    table = pa.Table.from_pylist(rows, schema=ATTACK_FILE_SCHEMA)
    data = parquet_bytes(table)
    if fault("kill_attack_write", job.key, storage):
        die_mid_write(storage, data, out)
    storage.write_bytes(out, data)
    return storage.url(out)


def parquet_bytes(table: pa.Table) -> bytes:
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def attack_problem(storage: Storage, job: AttackJob, rec: dict | None = None, data: bytes | None = None) -> str | None:
    """Why the attack file of ``job`` cannot be used, or None when it is complete: it must open as
    Parquet with ATTACK_FILE_SCHEMA, hold one row per eps of the chunk for this model, and have
    been made from the model file that is there now (its SHA-256; files from before hashes were
    recorded have none and are accepted)."""
    path = storage.attack_file(job)
    data = storage.read_bytes(path) if data is None else data
    if data is None:
        return f"missing attack file {storage.url(path)}"
    rec = storage.read_record(job.model_key) if rec is None else rec
    return _attack_table_problem(storage.url(path), data, job.model_key, job.eps_255, (rec or {}).get("model_sha256"))[1]


def _attack_table_problem(where, data, model_key=None, eps_255=None, model_sha=None, chunk=None):
    """(table, None) or (None, why) for one attack file's bytes; ``chunk``: the file's name
    without .parquet, which every row's chunk column must repeat."""
    import pyarrow.parquet as pq

    try:   # the plain file reader, one thread: pq.read_table's dataset scanner leaves work on Arrow's threads
        # after it returns, and a process that exits soon after can abort in teardown ("terminate called
        # without an active exception", apache/arrow#34314): `nodekd verify` did in 2 of 60 runs beside three busy
        # processes on 2 cores, 0 of 100 with this reader; benchmarks/probes/arrow_exit_abort.py: 11 of 30 against 0 of 30
        table = pq.ParquetFile(pa.BufferReader(data)).read(use_threads=False)
    except Exception as e:  # noqa: BLE001 - ArrowInvalid on truncated files, OSError
        return None, str(Damaged("attack file", where, f"not readable Parquet ({len(data)} bytes): "
                                                       f"{type(e).__name__}"))
    names = [f.name for f in ATTACK_FILE_SCHEMA]
    have = len(table.schema.names)
    if have < len(names) and table.schema.names == names[:have] and len(names) - have <= len(_LATER_FIELDS):
        for f in list(ATTACK_FILE_SCHEMA)[have:]:    # written before these columns existed
            table = table.append_column(f, pa.nulls(len(table), f.type))
    if not table.schema.equals(ATTACK_FILE_SCHEMA):
        return None, str(Damaged("attack file", where, "its columns are not the attack schema's"))
    rows = table.to_pylist()
    if chunk is not None and any(r["chunk"] != chunk for r in rows):
        return None, str(Damaged("attack file", where, "holds the rows of another file (its chunk column names "
                                                       "another)"))
    if model_key is not None:
        if any(r["model_key"] != model_key for r in rows):
            return None, str(Damaged("attack file", where, f"holds rows of another model than {model_key}"))
        if sorted(r["eps_255"] for r in rows) != sorted(float(e) for e in eps_255):
            return None, str(Damaged("attack file", where, f"{len(rows)} rows for eps {[r['eps_255'] for r in rows]}, "
                                                           f"expected one per eps of {list(eps_255)}"))
    stale = _stale_rows(where, table, model_sha)
    return (None, stale) if stale else (table, None)


def _stale_rows(where, table, model_sha) -> str | None:
    """Rows made from another model file than the one recorded now (files from before hashes pass)."""
    if model_sha and any(v not in (None, model_sha) for v in table.column("model_sha256").to_pylist()):
        return str(Damaged("attack file", where, "made from an earlier model file (the model was retrained since)"))
    return None


def read_attacks(storage: Storage):
    """All usable attack results as one pyarrow Table with ATTACK_SCHEMA (empty when there are none).

    Each file is checked (see attack_problem); a damaged or stale one is reported in one line
    and left out. Files that are not attack results (other names, hidden temporaries, folders
    outside dataset=D/attack=A) are ignored.
    """
    root = storage.path("results", "attacks")
    tables = []
    records = {}
    for path in storage.files(root, recursive=True):
        parts = path.replace(os.sep, "/").split("/")
        if (len(parts) < 3 or not parts[-1].endswith(".parquet") or parts[-1].startswith(".")
                or not parts[-3].startswith("dataset=") or not parts[-2].startswith("attack=")):
            continue
        table, problem = _attack_table_problem(storage.url(path), storage.read_bytes(path) or b"",
                                               chunk=parts[-1][:-len(".parquet")])
        if table is not None and len(table):
            key = table.column("model_key")[0].as_py()
            if key not in records:
                records[key] = storage.read_record(key) or {}
            problem = _stale_rows(storage.url(path), table, records[key].get("model_sha256"))
        if problem:
            storage.report(f"{problem}; left out")
            continue
        n = len(table)
        table = table.append_column("dataset", pa.array([parts[-3].split("=", 1)[1]] * n, pa.string()))
        tables.append(table.append_column("attack", pa.array([parts[-2].split("=", 1)[1]] * n, pa.string())))
    return pa.concat_tables(tables) if tables else ATTACK_SCHEMA.empty_table()
