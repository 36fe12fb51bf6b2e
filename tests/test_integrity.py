"""Verified reads without Ray: a finished tiny sweep folder, made by the sweep's own work
functions, damaged in each way a long run can damage it; what `nodekd verify`, `nodekd report`
and the sweep's checks then say. The storage lock. Bad inputs that used to be tracebacks."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch

from nodekd_ray import sweep as S
from nodekd_ray.cli import main as nodekd
from nodekd_ray.errors import ConfigError
from nodekd_ray.lock import LOCK_NAME, StorageLock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = S.Settings(teacher={"epochs": 1, "batch_size": 32},
                  student={"epochs": 1, "batch_size": 32, "width": 8, "stem_channels": 4},
                  attack_images=16, attack_batch_size=16)
TEACHER = S.TeacherJob("synthetic", "resnet20")
KD = S.StudentJob("synthetic", 1.0, 0, "resnet20", 3.0, 0.9, "paper")
NODE = S.StudentJob("synthetic", 1.0, 0)
ATTACKS = [S.AttackJob(k, "synthetic", "pgd", (0.0, 8.0)) for k in (TEACHER.key, NODE.key, KD.key)]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished folder: a teacher, its logits, a KD and a no-KD student, one PGD file per model,
    and the plan a sweep writes."""
    from nodekd_ray.data import load_dataset

    root = str(tmp_path_factory.mktemp("finished"))
    st = S.Storage(root)
    data = load_dataset("synthetic", synthetic_sizes=(64, 32))
    st.check_settings(TINY, create=True)
    S.run_training(TEACHER, TINY, st, data)
    table = S.logit_table(TEACHER, "paper", TINY, st, data)
    S.run_training(KD, TINY, st, data, table=table)
    S.run_training(NODE, TINY, st, data)
    for job in ATTACKS:
        S.run_attack(job, TINY, st, data[1])
    st.write_json({"models": [TEACHER.key, KD.key, NODE.key],
                   "attacks": [{"type": "AttackJob", "key": a.key, "model_key": a.model_key, "dataset": a.dataset,
                                "attack": a.attack, "eps_255": list(a.eps_255)} for a in ATTACKS]},
                  st.path("plans", "test.json"))
    return root, data


def _truncate(path, keep=0.5):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])


def _record(st, key, **changes):
    rec = st.read_record(key)
    rec.update(changes)
    for k, v in changes.items():
        if v is None:
            rec.pop(k)
    st.write_record(key, rec)


# name -> (damage(storage), the line `nodekd verify` prints for it, whether the sweep redoes a model)
DAMAGES = {
    "truncated parquet": (lambda st: _truncate(st.attack_file(ATTACKS[1])),
                          "DAMAGED damaged attack file {p}: not readable Parquet", None),
    "parquet of the wrong chunk": (lambda st: shutil.copy(st.attack_file(ATTACKS[0]), st.attack_file(ATTACKS[1])),
                                   "DAMAGED damaged attack file {p}: holds rows of another model", None),
    "truncated record": (lambda st: _truncate(st.record(NODE.key)),
                         "DAMAGED damaged file {r}: not valid JSON", NODE),
    "truncated model": (lambda st: _truncate(st.model(KD.key)),
                        "DAMAGED damaged model {m}: ", KD),
    "deleted model, record says done": (lambda st: os.remove(st.model(NODE.key)),
                                        "DAMAGED missing model {m} (its record says done)", NODE),
    "a ResNet where a NODE belongs": (lambda st: shutil.copy(st.model(TEACHER.key), st.model(KD.key)),
                                      "DAMAGED damaged model {m}: ", KD),
    "a ResNet where a NODE belongs, record without hash": (
        lambda st: (shutil.copy(st.model(TEACHER.key), st.model(KD.key)),
                    _record(st, KD.key, model_sha256=None, model_bytes=None)),
        "DAMAGED damaged model {m}: {m} holds a 'resnet20' model; expected node", KD),
    "truncated logits": (lambda st: _truncate(st.logits(TEACHER.key, "paper")),
                         "DAMAGED damaged logits {l}: ", None),
    "logits of a retrained teacher": (lambda st: _record(st, TEACHER.key, model_sha256="0" * 64),
                                      "DAMAGED damaged logits {l}: made by an earlier", TEACHER),
    "truncated settings": (lambda st: _truncate(st.path("settings.json")),
                           "DAMAGED damaged file {s}: not valid JSON", None),
}


def _paths(st, job):
    return dict(p=st.attack_file(ATTACKS[1]), r=st.record(job.key if job else NODE.key),
                m=st.model(job.key if job else KD.key), l=st.logits(TEACHER.key, "paper"), s=st.path("settings.json"))


@pytest.mark.parametrize("name", list(DAMAGES))
def test_each_damage_is_reported_in_one_line_and_left_out(finished, tmp_path, capsys, name):
    damage, line, redo = DAMAGES[name]
    root = str(tmp_path / "store")
    shutil.copytree(finished[0], root)
    st = S.Storage(root)
    assert nodekd(["verify", root]) == 0
    capsys.readouterr()
    damage(st)

    # verify: exit 1 and one DAMAGED line that says what, where and why
    assert nodekd(["verify", root]) == 1
    out = capsys.readouterr().out
    damaged = [x for x in out.splitlines() if x.startswith("DAMAGED")]
    want = line.format(**_paths(st, redo))
    assert any(x.startswith(want) for x in damaged), (want, out)
    if "parquet" in name or name in ("truncated settings", "truncated logits", "truncated record"):
        assert len(damaged) == 1, out

    # the sweep's own checks: a damaged model is not done (it is retrained), never blocks as "unfinished"
    fresh = S.Storage(root)
    fresh.warn = lambda line: None
    if redo is not None and redo is not TEACHER:
        assert not fresh.done(redo)
        assert fresh.stale_done(redo) or name == "truncated record"
    for job in (TEACHER, KD, NODE):
        if job is not redo:
            assert fresh.done(job), job.key

    # report: exit 0, each damaged file named on stderr in one line and left out
    assert nodekd(["report", root]) == 0
    err = capsys.readouterr().err
    if "parquet" in name:
        assert err.count("damaged attack file") == 1 and "left out" in err, err
        rows = S.read_attacks(fresh).to_pylist()
        assert {r["model_key"] for r in rows} == {TEACHER.key, KD.key}
    if name == "truncated record":
        assert "damaged file" in err and "left out" in err


def test_files_that_are_not_results_are_ignored(finished, tmp_path, capsys):
    root = str(tmp_path / "store")
    shutil.copytree(finished[0], root)
    st = S.Storage(root)
    for rel in ("results/attacks/README.txt", "results/attacks/dataset=synthetic/notes.md", "records/NOTES",
                "records/.DS_Store", "logits/README", "results/attacks/dataset=synthetic/attack=pgd/.x.parquet.tmp"):
        with open(os.path.join(root, rel), "w") as f:
            f.write("not a result")
    assert nodekd(["verify", root]) == 0
    out = capsys.readouterr().out
    assert "complete: 3 models, 1 logit tables, 3 attack files" in out and "missing: 0, damaged: 0" in out, out
    assert len(S.read_attacks(st)) == 6 and nodekd(["report", root]) == 0
    assert capsys.readouterr().err == ""


def test_verify_lists_missing_work_from_the_plan(finished, tmp_path, capsys):
    root = str(tmp_path / "store")
    shutil.copytree(finished[0], root)
    st = S.Storage(root)
    os.remove(st.attack_file(ATTACKS[2]))
    os.remove(st.record(KD.key))
    os.remove(st.model(KD.key))
    assert nodekd(["verify", root]) == 0   # missing is not damage: the sweep has not got there
    out = capsys.readouterr().out
    assert f"missing model {KD.key}: not trained yet" in out
    assert f"missing attack {ATTACKS[2].key} (pgd): not run yet" in out
    assert nodekd(["verify", str(tmp_path / "nothing")]) == 2


def test_a_retrained_model_makes_its_old_attack_rows_stale(finished, tmp_path):
    root = str(tmp_path / "store")
    shutil.copytree(finished[0], root)
    st = S.Storage(root)
    st.warn = lambda line: None
    S.run_training(NODE, S.Settings(**{**TINY.to_dict(), "student": {**TINY.student, "lr": 0.01}}), st, finished[1])
    problem = S.attack_problem(st, ATTACKS[1])
    assert problem and "made from an earlier model file" in problem
    assert {r["model_key"] for r in S.read_attacks(st).to_pylist()} == {TEACHER.key, KD.key}


def test_a_damaged_logits_table_is_computed_again(finished, tmp_path):
    root = str(tmp_path / "store")
    shutil.copytree(finished[0], root)
    st = S.Storage(root)
    good = S.logit_table(TEACHER, "paper", TINY, st, finished[1])
    _truncate(st.logits(TEACHER.key, "paper"))
    said = []
    st.warn = said.append
    again = S.logit_table(TEACHER, "paper", TINY, st, finished[1])
    assert torch.equal(torch.from_numpy(again), torch.from_numpy(good))
    assert len(said) == 1 and said[0].startswith("damaged logits") and said[0].endswith("computing it again")
    assert S.logits_problem(st, TEACHER, "paper", st.read_record(TEACHER.key), open(st.logits(TEACHER.key, "paper"), "rb").read()) is None


def test_attacking_a_damaged_or_swapped_model_is_a_one_line_error(finished, tmp_path):
    root = str(tmp_path / "store")
    shutil.copytree(finished[0], root)
    st = S.Storage(root)
    shutil.copy(st.model(TEACHER.key), st.model(NODE.key))
    with pytest.raises(ConfigError, match="damaged model .*SHA-256") as e:
        S.run_attack(ATTACKS[1], TINY, st, finished[1][1])
    assert len(str(e.value).splitlines()) == 1
    _record(st, NODE.key, model_sha256=None, model_bytes=None)   # an old record: the architecture decides
    with pytest.raises(ConfigError, match="holds a 'resnet20' model; expected node"):
        S.run_attack(ATTACKS[1], TINY, st, finished[1][1])


# ----------------------------------------------------------------------------- the lock


def test_the_lock_names_its_holder_and_refuses_a_second_run(tmp_path):
    st = S.Storage(str(tmp_path))
    with StorageLock(st, "the test sweep", heartbeat_s=0.2) as lk:
        first = json.load(open(st.path(LOCK_NAME)))
        assert first["pid"] == os.getpid() and first["host"] == socket.gethostname() and first["what"] == "the test sweep"
        time.sleep(0.6)
        assert json.load(open(st.path(LOCK_NAME)))["heartbeat"] > first["heartbeat"]   # renewed
        # another process: refused with one line naming the holder, before Ray starts
        r = subprocess.run([sys.executable, os.path.join(ROOT, "sweeps", "table1.py"), "--dataset", "digits",
                            "--smoke-test", "--storage", str(tmp_path), "--address", "local"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip().splitlines() == [r.stderr.strip()]
        assert f"storage: {tmp_path} is in use by the test sweep on host {socket.gethostname()} pid {os.getpid()}" in r.stderr
        assert not os.path.exists(st.path("records")) and lk.count == 1
    assert not os.path.exists(st.path(LOCK_NAME))   # released


def test_a_dead_holders_lock_is_taken_over(tmp_path):
    st = S.Storage(str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    now = time.time()
    holder = {"id": "x", "what": "an old sweep", "host": socket.gethostname(), "pid": int(dead.stdout),
              "started": now, "started_at": "", "heartbeat": now, "stale_after_s": 120}
    said = []
    for h, why in [(holder, "no longer runs on this host"),
                   ({**holder, "host": "elsewhere", "pid": 1, "heartbeat": now - 500}, "last heartbeat was 500s ago")]:
        st.write_json(h, st.path(LOCK_NAME))
        with StorageLock(st, "me", log=said.append):
            assert json.load(open(st.path(LOCK_NAME)))["pid"] == os.getpid()
        assert why in said[-1] and said[-1].startswith("storage: taking over the lock of an old sweep")
    # a live holder on another host (fresh heartbeat) is not taken over
    st.write_json({**holder, "host": "elsewhere", "pid": 1, "heartbeat": time.time()}, st.path(LOCK_NAME))
    with pytest.raises(ConfigError, match="is in use by an old sweep on host elsewhere pid 1"):
        StorageLock(st, "me").acquire()


def test_cleaning_temporaries_spares_the_lock_and_reports(tmp_path):
    st = S.Storage(str(tmp_path))
    for rel in ("models/.a.pt.1.tmp", ".lock.json.2.tmp", "report/.table1.md.3.tmp", "records/.k.json.4.tmp"):
        os.makedirs(os.path.dirname(os.path.join(tmp_path, rel)), exist_ok=True)
        open(os.path.join(tmp_path, rel), "w").close()
    assert st.remove_stale_temporaries() == 2
    assert os.path.exists(tmp_path / ".lock.json.2.tmp") and os.path.exists(tmp_path / "report/.table1.md.3.tmp")


# ----------------------------------------------------------------------------- bad inputs


def test_bad_checkpoints_and_outputs_are_one_line_errors(tmp_path, capsys):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    keys = tmp_path / "keys.pt"
    torch.save({"format": "nodekd-checkpoint-v1", "arch": "node"}, keys)
    cases = [
        (["attack", "--checkpoint", str(empty), "--out", str(tmp_path / "a.parquet")],
         "checkpoint: cannot read"),
        (["attack", "--checkpoint", str(keys), "--out", str(tmp_path / "b.parquet")],
         "lacks num_classes, mean, std, node, state_dict"),
        (["train-teacher", "--epochs", "1", "--out", "/proc/nodekd-teacher.pt"], "out: cannot write to /proc"),
        (["train-student", "--no-kd", "--T", "inf", "--out", str(tmp_path / "s.pt")], "T: must be a finite number"),
        (["train-student", "--no-kd", "--lam", "nan", "--out", str(tmp_path / "s.pt")], "lam: must be a finite number"),
        (["train-student", "--no-kd", "--t1", "inf", "--out", str(tmp_path / "s.pt")], "t1: must be a finite number"),
        (["train-student", "--no-kd", "--step-size", "inf", "--out", str(tmp_path / "s.pt")], "step_size: must be"),
    ]
    for argv, want in cases:
        t0 = time.time()
        assert nodekd(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and want in err, (argv, err)
        assert time.time() - t0 < 30   # refused before any work
    assert sorted(os.listdir(tmp_path)) == ["empty.pt", "keys.pt"]


@pytest.mark.parametrize("args, want", [
    (["--temperatures", "inf"], "T: must be a finite number"),
    (["--horizons", "inf"], "horizon: must be a finite number"),
    (["--baseline-horizons", "nan"], "horizon: must be a finite number"),
    (["--lam", "nan"], "lam: must be a finite number"),
    (["--storage", "FILE"], "storage: {FILE} is a file, not a folder"),
    (["--storage", "/proc/nodekd-store"], "storage: cannot write to /proc/nodekd-store"),
])
def test_a_sweep_refuses_bad_floats_and_unwritable_storage_in_one_line(tmp_path, args, want):
    f = tmp_path / "a-file"
    f.write_text("x")
    args = [a.replace("FILE", str(f)) for a in args]
    store = [] if "--storage" in args else ["--storage", str(tmp_path / "never")]
    cmd = [sys.executable, os.path.join(ROOT, "sweeps", "figure1.py"), "--dataset", "digits", "--smoke-test",
           "--address", "local", *store, *args]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.startswith(f"figure1.py: error: {want.format(FILE=f)}"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "never").exists()


def test_rows_state_their_computation_and_old_files_without_it_still_read_and_report(finished, tmp_path):
    """Every attack row says how it was computed; a folder written before these columns existed (its files
    end at num_classes) still reads, with nulls there, verifies and reports."""
    import pyarrow.parquet as pq

    from nodekd_ray.report import write_report

    root, _ = finished
    rows = S.read_attacks(S.Storage(root)).to_pylist()
    assert rows and all(r["computation"] == "reference" and r["precision"] == "fp32" and r["cuda_graphs"] is False
                        and r["torch_version"] == torch.__version__ for r in rows)
    nodes = [r for r in rows if r["kind"] != "teacher"]
    assert nodes and all(r["solver_impl"] == "torchdiffeq" and r["step_control"] == "plain" for r in nodes)
    assert all(r["solver_impl"] == "" for r in rows if r["kind"] == "teacher")
    old = str(tmp_path / "old")
    shutil.copytree(root, old)
    st = S.Storage(old)
    names = [f.name for f in S.ATTACK_FILE_SCHEMA]
    before = names[:names.index("num_classes") + 1]          # the columns of the files written before
    for job in ATTACKS:
        path = st.attack_file(job)
        pq.write_table(pq.read_table(path).select(before), path)
        assert pq.read_schema(path).names == before
    back = S.read_attacks(st).to_pylist()
    assert len(back) == len(rows) and all(r["computation"] is None and r["precision"] is None for r in back)
    assert [r["robust_accuracy"] for r in back] == [r["robust_accuracy"] for r in rows]
    assert nodekd(["verify", "-q", old]) == 0
    out = write_report(old)
    assert out and all(os.path.exists(p) for p in out.values()), out


def test_verify_and_the_report_say_when_one_cell_holds_rows_computed_differently(finished, tmp_path):
    """A second seed of the no-KD NODE attacked as trained (bf16) beside the first attacked on the reference:
    `nodekd verify` prints a MIXED line per cell, the report marks those cells and lists both computations."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from nodekd_ray.report import write_report

    root, _ = finished
    mixed = str(tmp_path / "mixed")
    shutil.copytree(root, mixed)
    st = S.Storage(mixed)
    seed1 = S.StudentJob("synthetic", 1.0, 1)
    rec = st.read_record(NODE.key)
    rec.update(key=seed1.key, seed=1)
    st.write_record(seed1.key, rec)
    shutil.copy(st.model(NODE.key), st.model(seed1.key))
    job = S.AttackJob(seed1.key, "synthetic", "pgd", (0.0, 8.0))
    table = pq.read_table(st.attack_file(ATTACKS[1])).to_pylist()
    for r in table:
        r.update(model_key=seed1.key, seed=1, chunk=job.key, computation="as-trained", precision="bf16",
                 solver_impl="nodekd")
    os.makedirs(os.path.dirname(st.attack_file(job)), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(table, schema=S.ATTACK_FILE_SCHEMA), st.attack_file(job))
    r = subprocess.run([sys.executable, "-m", "nodekd_ray.cli", "verify", mixed], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    lines = [x for x in r.stdout.splitlines() if x.startswith("MIXED")]
    assert len(lines) == 2 and all("synthetic pgd NODE(1) eps" in x for x in lines), r.stdout
    assert "as-trained: bf16, nodekd/plain, cpu | reference: fp32, torchdiffeq/plain, cpu" in lines[0]
    text = open(write_report(mixed)["Attacks"]).read()
    assert "† 2 cell(s) average rows computed differently" in text and " †" in text
    assert "Computed on: as-trained: bf16, nodekd/plain, cpu; reference: fp32, cpu; reference: fp32, " \
           "torchdiffeq/plain, cpu." in text   # the ResNet's rows have no solver
    # the unmixed folder: no mark, no MIXED line
    assert "†" not in open(write_report(root)["Attacks"]).read()
