"""--storage as a URI: an S3 bucket served by a local moto server (the real S3 protocol, through
pyarrow's S3 file system, as on a cluster; the s3 fixture is in conftest.py). Ray-free work functions against the same run on local
disk, the Optuna journal's round trip, bad URIs, and the lambda/T search continuing its study from S3.
Sweeps on S3 with a trial retried from its S3 checkpoint, an attack killed mid-write and an interrupted
driver are in test_orchestration.py."""
import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from nodekd_ray import report as R
from nodekd_ray import sweep as S
from nodekd_ray.errors import ConfigError
from nodekd_ray.storage import Storage
from test_orchestration import SUBSET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = S.Settings(teacher={"epochs": 2, "batch_size": 64}, student={"epochs": 2, "batch_size": 64, "width": 8,
                                                                     "stem_channels": 8},
                  attack_images=40, attack_batch_size=40)


def test_files_are_atomic_on_s3(s3):
    st = Storage(s3())
    assert not st.local and st.root.startswith("s3://nodekd/exp-") and st.base.startswith("nodekd/exp-")
    st.check_reachable()
    rec = {"key": "k", "status": "done"}
    st.write_json(rec, st.record("k"))
    assert st.read_json(st.record("k")) == rec and st.records() == [rec]
    assert st.read_bytes(st.record("missing")) is None and not st.exists(st.model("k"))
    st.write_bytes(st.model("k"), b"x" * 10)
    st.write_bytes(st.model("k"), b"y" * 5)  # replaces, as a rename does
    assert st.read_bytes(st.model("k")) == b"yyyyy"
    assert st.url(st.model("k")) == f"s3://{st.base}/models/k.pt"

    # a failed move leaves neither the final name nor the temporary
    class Broken:
        def __init__(self, fs):
            self.fs = fs

        def __getattr__(self, name):
            return getattr(self.fs, name)

        def move(self, src, dst):
            raise OSError("network down")

    real, st.fs = st.fs, Broken(st.fs)
    with pytest.raises(OSError, match="network down"):
        st.write_bytes(st.model("broken"), b"z")
    st.fs = real
    assert st.files(st.path("models")) == [st.model("k")]

    # temporaries of killed writers are swept up; Tune's own folder is left alone
    with st.fs.open_output_stream(st.temporary(st.model("k2"))) as f:
        f.write(b"half")
    st.write_bytes(st.path("tune", ".x.tmp"), b"tune's")
    assert st.remove_stale_temporaries() == 1
    assert [os.path.basename(p) for p in st.files(st.path("models"))] == ["k.pt"]
    assert st.exists(st.path("tune", ".x.tmp"))
    # Storage objects travel to Ray workers by their root and rebuild the same file system
    import pickle

    again = pickle.loads(pickle.dumps(st))
    assert again.root == st.root and again.read_bytes(st.model("k")) == b"yyyyy"


def test_bad_storage_uris_are_one_line_errors(s3, tmp_path):
    with pytest.raises(ConfigError) as e:
        Storage("nosuch://bucket/x")
    assert e.value.field == "storage" and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="storage: .*does not exist") as e:
        Storage(s3(bucket="no-such-bucket")).check_reachable()
    assert "\n" not in str(e.value)
    # credentials in a URI never reach a message
    with pytest.raises(ConfigError, match="storage: ") as e:
        Storage(s3() + "&access_key=test&secret_key=SECRET-VALUE").check_reachable()
    assert "SECRET-VALUE" not in str(e.value) and "secret_key=***" in str(e.value)
    # file:// URIs are local folders
    st = Storage(f"file://{tmp_path}/exp")
    assert st.local and st.root == f"{tmp_path}/exp"
    # through a sweep script: exit 2, one line, before Ray starts
    for bad in ("nosuch://bucket/x", s3(bucket="no-such-bucket")):
        r = subprocess.run([sys.executable, os.path.join(ROOT, "sweeps", "table2.py"), "--storage", bad],
                           cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ))
        assert r.returncode == 2 and r.stderr.startswith("table2.py: error: storage: "), r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def _run_jobs(st, data):
    tj = S.TeacherJob("synthetic", "resnet20")
    S.run_training(tj, TINY, st, data)
    table = S.logit_table(tj, "paper", TINY, st, data)
    kd = S.StudentJob("synthetic", 1.0, 0, "resnet20", 3.0, 0.9, "paper")
    S.run_training(kd, TINY, st, data, table=table)
    S.run_attack(S.AttackJob(kd.key, "synthetic", "pgd", (0.0, 8.0)), TINY, st, data[1])
    S.run_attack(S.AttackJob(tj.key, "synthetic", "mifgsm", (4.0,)), TINY, st, data[1])
    return tj, kd, table


def test_the_work_functions_give_the_same_results_on_s3_as_on_local_disk(s3, tmp_path, synthetic):
    data = (synthetic[0].take(128), synthetic[1].take(64))
    local, remote = Storage(tmp_path / "local"), Storage(s3())
    tj, kd, table = _run_jobs(local, data)
    _, _, table_s3 = _run_jobs(remote, data)
    assert np.array_equal(table, table_s3)
    assert np.array_equal(np.load(io.BytesIO(remote.read_bytes(remote.logits(tj.key, "paper")))), table)
    for key in (tj.key, kd.key):
        a = torch.load(local.model(key), weights_only=True)["state_dict"]
        b = torch.load(io.BytesIO(remote.read_bytes(remote.model(key))), weights_only=True)["state_dict"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        ra, rb = local.read_record(key), remote.read_record(key)
        assert rb["status"] == "done" and rb["history"] == [{**h, "seconds": hb["seconds"]}
                                                            for h, hb in zip(ra["history"], rb["history"])]
    # a cached table is read back from S3, not recomputed
    assert np.array_equal(S.logit_table(tj, "paper", TINY, remote, data), table)
    # attack Parquet: same rows (timings aside), read through the hive-partitioned data set on S3
    drop = ("seconds", "task_seconds", "model_sha256")   # checkpoints hold their folder's paths

    def rows(st):
        return sorted(({k: v for k, v in r.items() if k not in drop} for r in S.read_attacks(st).to_pylist()),
                      key=lambda r: (r["model_key"], r["eps_255"]))

    assert len(rows(remote)) == 3 and rows(remote) == rows(local)
    # TensorBoard: every epoch's scalars and the hyperparameters were uploaded
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    down = tmp_path / "tb"
    for path in remote.files(remote.tensorboard(kd.key), recursive=True):
        rel = path[len(remote.tensorboard(kd.key)) + 1:]
        assert remote.download(path, str(down / rel))
    ev = EventAccumulator(str(down))
    ev.Reload()
    assert len(ev.Scalars("node1-kd/test_accuracy")) == 2
    hp = EventAccumulator(str(down / "hparams"))
    hp.Reload()
    assert "hparam/test_accuracy" in hp.Tags()["scalars"]
    # the report reads records and Parquet from S3 and writes there
    paths = R.write_report(remote.root)
    assert paths["Figure 1"] == remote.url(remote.path("report", "figure1.png"))
    assert remote.read_bytes(remote.path("report", "figure1.png"))[:8] == b"\x89PNG\r\n\x1a\n"
    assert remote.read_bytes(remote.path("report", "table2.md")) == open(R.write_report(str(local.root))["Table 2"],
                                                                          "rb").read()
    assert not os.path.exists(os.path.join(ROOT, "s3:")) and not os.path.exists("s3:")  # nothing written locally


def test_the_optuna_journal_survives_on_s3(s3):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from nodekd_ray.orchestration.search import _JournalSync

    st = Storage(s3())
    sync = _JournalSync(st)
    assert sync.url == f"s3://{st.base}/optuna.journal" and not sync.local.startswith(st.base)
    study = optuna.create_study(study_name="s", storage=JournalStorage(JournalFileBackend(sync.local)))
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    sync.upload()
    os.remove(sync.local)  # another machine: only the storage has the journal
    again = _JournalSync(st)
    study = optuna.load_study(study_name="s", storage=JournalStorage(JournalFileBackend(again.local)))
    assert len(study.trials) == 2
    # a stale local copy never wins over the storage's journal
    other = Storage(s3())
    with open(_JournalSync(other).local, "w") as f:
        f.write("stale")
    assert not os.path.exists(_JournalSync(other).local)


@pytest.mark.slow
def test_the_lambda_T_search_continues_its_study_from_s3(s3, tmp_path):
    uri = s3()
    cmd = [sys.executable, os.path.join(ROOT, "sweeps", "search_lambda_T.py"), "--dataset", "digits", "--smoke-test",
           "--teacher", "resnet20", "--epochs", "1", "--address", "local", "--num-cpus", "2", *SUBSET,
           "--storage", uri]
    r = subprocess.run(cmd + ["--num-samples", "1"], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    st = Storage(uri)
    assert st.exists(st.path("optuna.journal")) and "over 1 full-length trials" in r.stdout
    from nodekd_ray.orchestration.search import _JournalSync

    os.remove(_JournalSync(st).local)  # as on a fresh head node: the study must come from S3
    r = subprocess.run(cmd + ["--num-samples", "2"], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "1 finished trials" in r.stdout and "1 to run" in r.stdout and "over 2 full-length trials" in r.stdout
    best = st.read_json(st.path("lam-T-digits-resnet20-t1-paper.json"))
    assert best["trials"] == 2 and best["journal"] == f"s3://{st.base}/optuna.journal"
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_search_trial_left_running_is_queued_again_and_resumes_from_its_checkpoint(where, tmp_path, s3):
    """A killed search leaves its running trials RUNNING in the Optuna journal and their checkpoints in
    the old Tune experiment; the rerun closes them as FAIL, queues their (lam, T) first, and hands the
    trial the checkpoint to start from."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from nodekd_ray.orchestration.search import interrupted_checkpoints, reopen_interrupted, search_key

    journal = JournalStorage(JournalFileBackend(str(tmp_path / "optuna.journal")))
    study = optuna.create_study(study_name="lam-T-x", storage=journal, direction="maximize")
    space = {"lam": optuna.distributions.FloatDistribution(0, 1),
             "T": optuna.distributions.FloatDistribution(1, 30, log=True)}   # the search's (OptunaSearch suggests)
    study.tell(study.ask(space), 0.5)
    left = study.ask(space)   # the killed run's trial
    reopened = reopen_interrupted(optuna.load_study(study_name="lam-T-x", storage=journal), log=lambda *a: None)
    assert reopened == [left.params]
    study = optuna.load_study(study_name="lam-T-x", storage=journal)
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "FAIL", "WAITING"]
    again = study.ask(space)
    assert again.params == left.params and again.user_attrs["reopens_trial"] == left.number
    # its checkpoints in the earlier experiment: the latest one, found by its (lam, T)
    st = Storage(str(tmp_path / "store") if where == "local" else s3())
    base = {"type": "StudentJob", "dataset": "digits", "t1": 1.0, "seed": 0, "teacher": "resnet20", "T": None,
            "lam": None, "logits_mode": "paper"}
    trial = st.path("tune", "lam-T-x-1", "search_trial_ab12_00001")
    st.write_json({"lam": left.params["lam"], "T": left.params["T"]}, trial + "/params.json")
    for k in (0, 1):
        st.write_bytes(trial + f"/checkpoint_00000{k}/state.pt", b"epoch %d" % k)
    other = st.path("tune", "another-study-1", "t", "checkpoint_000005")
    st.write_json({"lam": left.params["lam"], "T": left.params["T"]}, other.rsplit("/", 1)[0] + "/params.json")
    st.write_bytes(other + "/state.pt", b"not this study's")
    done_trial = st.path("tune", "lam-T-x-0", "search_trial_cd34_00000")   # a finished trial's: not resumed
    st.write_json({"lam": 0.25, "T": 3.0}, done_trial + "/params.json")
    st.write_bytes(done_trial + "/checkpoint_000001/state.pt", b"finished")
    found = interrupted_checkpoints(st, "lam-T-x", base, reopened)
    key = search_key(base, left.params["lam"], left.params["T"])["key"]
    assert list(found) == [key] and st.read_bytes(found[key]) == b"epoch 1"
    assert interrupted_checkpoints(st, "lam-T-x", base, []) == {}
