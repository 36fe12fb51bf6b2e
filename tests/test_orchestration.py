"""The Ray layer end to end on a local Ray instance: a tiny grid, injected faults, an interrupted
and resumed driver, bad grids. Each sweep runs as a user would run it: a sweep script in a
subprocess (its own local Ray instance, exit code, stdout)."""
import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from nodekd_ray import sweep as S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the tests' sweeps train on 256 digits images and test on 128 (--smoke-test alone: 1024 and 256): a tiny
# figure1 sweep took 53 s instead of 98 s; what they test (plumbing, faults, resume) does not depend on the size
SUBSET = ["--limit-train", "256", "--limit-test", "128"]
TINY = ["--dataset", "digits", "--smoke-test", "--teachers", "resnet20", "--horizons", "1",
        "--baseline-horizons", "1", "--epochs", "2", "--attack-images", "32", "--address", "local",
        "--num-cpus", "2", *SUBSET]
# for tests that need no second epoch (TINY's 2: a trial retried from its epoch-1 checkpoint finishes at 2)
EPOCH1 = ["--epochs", "1"]


def sweep(script, storage, *extra, faults=None, wait=True, cwd=ROOT):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("NODEKD_FAULTS", None)
    if faults:
        env["NODEKD_FAULTS"] = json.dumps(faults)
    cmd = [sys.executable, os.path.join(ROOT, "sweeps", script), *TINY, "--storage", str(storage), *extra]
    if not wait:
        return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=900)


def rows(storage):
    return S.read_attacks(S.Storage(str(storage))).to_pylist()


def attack_files(storage):
    out = {}
    for dirpath, _, files in os.walk(os.path.join(storage, "results")):
        for f in files:
            out[os.path.join(dirpath, f)] = os.path.getmtime(os.path.join(dirpath, f))
    return out


@pytest.mark.slow
def test_tiny_grid_end_to_end_with_faults(s3, tmp_path):
    """figure1 on digits into s3:// (Tune's checkpoints, the experiment and every result through the
    storage's file system, as on a cluster): teacher, NODE(1), KD students at T=3 and T=10, PGD + MI-FGSM.

    Injected: the T=3 student raises after epoch 1 (Tune restores it from the checkpoint it synced
    to S3); the T=10 student's ODE state turns NaN after epoch 1 (a real ODESolveError: it fails with
    its reason, the rest finishes); one attack task dies mid-write with no retries left (no file
    under its final name; the --resume rerun removes the partial file and writes only that one).
    The same retry from a local checkpoint runs in test_integrity_sweep.
    """
    uri = s3()
    st = S.Storage(uri)
    kd3 = "kd-digits-t1-resnet20-T3-lam0.9-s0"
    kd10 = "kd-digits-t1-resnet20-T10-lam0.9-s0"
    killed = "node-digits-t1-s0-pgd-eps0-12"
    faults = {"raise_in_training": {"key": kd3, "epoch": 1}, "ode_nan": {"key": kd10, "epoch": 1},
              "kill_attack_write": {"key": killed}}
    r = sweep("figure1.py", uri, "--temperatures", "3", "10", "--attack-retries", "0", faults=faults, cwd=tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out[-3000:]
    assert f"FAILED trial {kd10}: ODESolveError" in out and f"FAILED attack {killed}" in out
    # one progress line per stage event instead of Tune's status tables; the failed trial is counted
    assert re.search(r"figure1-students: \d+/\d+ done, \d+ running, 1 failed; \d+/\d+ epochs", out), out[-3000:]
    assert "Trial status" not in out

    # the retried trial resumed from its epoch-1 checkpoint, kept on S3, and finished
    rec = st.read_record(kd3)
    assert rec["status"] == "done" and rec["attempts"] == 2 and rec["started_from_epoch"] == [0, 1]
    assert [h["epoch"] for h in rec["history"]] == [1, 2]
    assert st.isdir(st.path("tune", "figure1-students")) and st.exists(st.path("tune", "figure1-students.jobs.json"))
    ckpts = [p for p in st.files(st.path("tune", "figure1-students", kd3), recursive=True) if p.endswith("state.pt")]
    assert ckpts, "Tune kept no checkpoint of the retried trial on S3"
    assert st.files(st.tensorboard(kd3), recursive=True)
    assert f"TensorBoard: tensorboard --logdir s3://{st.base}/tensorboard" in out
    # the ODE failure is recorded with its reason
    bad = st.read_record(kd10)
    assert bad["status"] == "failed" and "ODESolveError" in bad["error"] and "dopri5 failed" in bad["error"]
    # logits: one table for the one teacher; no student ran a teacher forward or loaded a teacher
    assert sorted(os.path.basename(p) for p in st.files(st.path("logits"))) == [
        "teacher-digits-resnet20-s0-paper.json", "teacher-digits-resnet20-s0-paper.npy"]
    table = np.load(io.BytesIO(st.read_bytes(st.logits("teacher-digits-resnet20-s0", "paper"))))
    assert table.shape == (256, 10)   # --limit-train
    assert all((st.read_record(k)["config"]["limit_train"], st.read_record(k)["config"]["limit_test"]) == (256, 128)
               for k in (kd3, "teacher-digits-resnet20-s0"))
    for key in (kd3, "node-digits-t1-s0"):
        final = st.read_record(key)["final"]
        assert final["teacher_forwards"] == 0 and final["teacher_checkpoint_loads"] == 0
    # the killed attack left no file under its final name (only a hidden partial one); the rest is there
    results = st.files(st.path("results"), recursive=True)
    parquet = [p for p in results if p.endswith(".parquet")]
    assert len(parquet) == 3 * 2 * 2 - 1 and not any(killed in p for p in parquet)  # 3 models x 2 attacks x 2 chunks
    assert any(killed in p and os.path.basename(p).startswith(".") for p in results)
    assert len(rows(uri)) == 3 * 2 * 6 - 4  # 3 good models x 2 attacks x 6 eps, minus the killed chunk (eps 0-12)
    assert st.read_bytes(st.path("report", "figure1.png"))[:4] == b"\x89PNG" and st.exists(st.path("report", "table2.md"))
    assert os.listdir(tmp_path) == []  # nothing landed in the working directory

    # rerun: only the missing attack file is written; no trial is trained again
    def mtime(p):
        return st.fs.get_file_info(p).mtime

    stamps = {p: mtime(p) for p in parquet}
    attempts = {k: st.read_record(k)["attempts"] for k in (kd3, "node-digits-t1-s0", "teacher-digits-resnet20-s0")}
    r2 = sweep("figure1.py", uri, "--temperatures", "3", "10", "--resume", cwd=tmp_path)
    assert r2.returncode == 1, (r2.stdout + r2.stderr)[-3000:]  # the NaN trial still fails, and says so
    assert "removed 1 partial file(s)" in r2.stdout
    after = st.files(st.path("results"), recursive=True)
    assert len(after) == 12 and set(parquet) < set(after) and not any("/." in p for p in after)
    assert [p for p in after if p not in parquet][0].endswith(f"/{killed}.parquet")
    assert all(mtime(p) == before for p, before in stamps.items())  # the others were not rewritten
    assert {k: st.read_record(k)["attempts"] for k in attempts} == attempts == {
        kd3: 2, "node-digits-t1-s0": 1, "teacher-digits-resnet20-s0": 1}
    got = rows(uri)
    keys = [(r["model_key"], r["attack"], r["eps_255"]) for r in got]
    assert len(got) == 36 and len(set(keys)) == len(keys)  # no duplicate rows
    for model in ("teacher-digits-resnet20-s0", "node-digits-t1-s0", kd3):
        for attack in ("pgd", "mifgsm"):
            eps = sorted(r["eps_255"] for r in got if r["model_key"] == model and r["attack"] == attack)
            assert eps == [0, 4, 8, 12, 16, 20]
    assert all(0 <= r["robust_accuracy"] <= r["clean_accuracy"] <= 1 and r["n_images"] == 32 for r in got)
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_interrupted_driver_resumes_without_rerunning_finished_trials(s3):
    """On S3, the harder path: Tune restores its experiment through the storage's file system. The
    same restore on a local folder runs in test_integrity_sweep (a damaged folder's --resume)."""
    store = s3()
    p = sweep("table2.py", store, *EPOCH1, "--temperatures", "3", "10", "20", "--max-concurrent", "1",
              wait=False)
    st = S.Storage(str(store))
    deadline = time.time() + 600
    first = None
    while time.time() < deadline and p.poll() is None:
        done = [r["key"] for r in st.records() if r["kind"] == "node_kd" and r["status"] == "done"]
        if done:
            first = done
            break
        time.sleep(1)
    assert first, "no student finished before the deadline"
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 130 and "rerun with --resume" in out, out[-3000:]
    kd_done = [r["key"] for r in st.records() if r["kind"] == "node_kd" and r["status"] == "done"]
    assert 1 <= len(kd_done) < 3
    # without --resume the interrupted sweep is refused, with a one-line error and exit 2
    r = sweep("table2.py", store, *EPOCH1, "--temperatures", "3", "10", "20")
    assert r.returncode == 2 and "--resume" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = sweep("table2.py", store, *EPOCH1, "--temperatures", "3", "10", "20", "--resume")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "table2-students: resuming the Tune experiment in " in r.stdout  # restored, not started afresh
    recs = {x["key"]: x for x in st.records()}
    assert sorted(k for k, x in recs.items() if x["kind"] == "node_kd" and x["status"] == "done") == sorted(
        f"kd-digits-t1-resnet20-T{T}-lam0.9-s0" for T in (3, 10, 20))
    for key in kd_done:  # finished before the interrupt: not trained again
        assert recs[key]["attempts"] == 1, recs[key]
    assert recs["teacher-digits-resnet20-s0"]["attempts"] == 1
    # a grown grid with --resume trains only the new student, in a new Tune experiment
    attempts = {k: x["attempts"] for k, x in recs.items()}
    r = sweep("table2.py", store, *EPOCH1, "--temperatures", "3", "10", "20", "5", "--resume")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    recs = {x["key"]: x for x in st.records()}
    new = "kd-digits-t1-resnet20-T5-lam0.9-s0"
    assert recs[new]["status"] == "done" and recs[new]["attempts"] == 1
    assert {k: x["attempts"] for k, x in recs.items() if k != new} == attempts
    assert st.isdir(st.path("tune", "table2-students-2"))


@pytest.mark.parametrize("args, field", [
    (["--teachers", "resnet21"], "teacher"), (["--temperatures", "0"], "T"), (["--lam", "1.5"], "lam"),
    (["--horizons", "-1"], "horizon"), (["--dataset", "mnist"], "dataset"), (["--limit-train", "0"], "limit_train"),
    (["--node", "step_control=noise-aware", "--node", "precision=bf16", "--node", "solver_impl=torchdiffeq"],
     "step_control"),
    (["--dataset", "cifar10", "--data-root", "/nonexistent/data", "--smoke-test", "--num-cpus", "2"], "data"),
    (["--dataset", "digits", "--smoke-test", "--num-cpus", "2", "--node", "norm_impl=triton", "--gpus-per-trial", "0"],
     "norm_impl"),   # triton kernels, trials without a GPU: refused once Ray says what the trials get
    (["--storage", "s3:/bucket/x"], "storage"),     # a URI without '//' would have become a local folder "s3:"
    (["--storage", "s3://"], "storage"),
])
def test_a_bad_grid_is_refused_before_any_trial(tmp_path, args, field):
    store = tmp_path / "never"
    cmd = [sys.executable, os.path.join(ROOT, "sweeps", "table2.py"), "--storage", str(store), *args]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    lines = [x for x in r.stderr.strip().splitlines() if "table2.py: error:" in x]
    assert len(lines) == 1 and lines[0].startswith(f"table2.py: error: {field}:"), r.stderr
    if field not in ("data", "norm_impl"):  # refused before Ray starts: nothing else on stderr either
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not store.exists()


def test_the_search_honours_dry_run_and_refuses_flags_it_would_not_use(tmp_path):
    """search_lambda_T.py --dry-run prints its plan and starts nothing (no storage folder, no Ray); a sweep flag
    the search does not read (--temperatures: it searches T) is refused, not ignored."""
    script = os.path.join(ROOT, "sweeps", "search_lambda_T.py")
    store = tmp_path / "store"
    r = subprocess.run([sys.executable, script, "--dataset", "digits", "--scale", "digits", "--dry-run", "--storage",
                        str(store), "--num-samples", "7"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "plan: lam/T search of resnet44 on digits" in r.stdout and "7 trials in all" in r.stdout
    assert "a new study" in r.stdout and not store.exists()
    r = subprocess.run([sys.executable, script, "--temperatures", "3", "--dry-run"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and "unrecognized arguments: --temperatures 3" in r.stderr
    r = subprocess.run([sys.executable, script, "--dry-run", "--storage", "gs:bucket"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "storage: 'gs:bucket' looks like a URI without '//'" in r.stderr


@pytest.mark.slow
def test_lambda_T_search_persists_its_optuna_study(tmp_path):
    store = tmp_path / "store"
    base = [sys.executable, os.path.join(ROOT, "sweeps", "search_lambda_T.py"), "--dataset", "digits", "--smoke-test",
            "--teacher", "resnet20", "--epochs", "2", "--address", "local", "--num-cpus", "2", *SUBSET,
            "--storage", str(store)]
    r = subprocess.run(base + ["--num-samples", "2"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "best: lam = " in r.stdout and "full-length trials of 2 epochs" in r.stdout
    assert "ASHA over 2 epochs, grace period 1 (0.25 of the epochs)" in r.stdout
    # progress lines instead of Tune's status tables
    assert re.search(r"lam-T-digits-resnet20-t1-paper: 2/2 trials ended \(\d full length, \d stopped early\)", r.stdout)
    assert "Trial status" not in r.stdout + r.stderr
    # a rerun asking for 3 samples continues the same study: one new trial, TPE sees all three
    r = subprocess.run(base + ["--num-samples", "3"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "2 finished trials" in r.stdout and "1 to run" in r.stdout
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    study = optuna.load_study(study_name="lam-T-digits-resnet20-t1-paper",
                              storage=JournalStorage(JournalFileBackend(str(store / "optuna.journal"))))
    states = optuna.trial.TrialState
    assert len(study.trials) == 3 and all(t.state in (states.COMPLETE, states.PRUNED) for t in study.trials)
    assert all(0 <= t.params["lam"] <= 1 and 1 <= t.params["T"] <= 30 for t in study.trials)
    # the rerun drew a new (lam, T): seeded like the first run, it drew the first run's first one again
    assert len({(round(t.params["T"], 3), round(t.params["lam"], 3)) for t in study.trials}) == 3
    # every proposal trained a KD student; a trial is COMPLETE exactly when its student ran both epochs
    kd = {(x["T"], x["lam"]): x for x in S.Storage(str(store)).records() if x["kind"] == "node_kd"}
    for t in study.trials:
        rec = kd[(round(t.params["T"], 3), round(t.params["lam"], 3))]
        assert (t.state == states.COMPLETE) == (len(rec["history"]) == 2), (t.state, rec["history"])
    done = [t for t in study.trials if t.state == states.COMPLETE]
    best = json.load(open(store / "lam-T-digits-resnet20-t1-paper.json"))
    assert best["best_test_accuracy"] == max(t.value for t in done) and best["trials"] == len(done)


def test_search_schedule_covers_the_whole_run_and_stopped_trials_are_pruned():
    import optuna
    from ray import tune

    from nodekd_ray.orchestration.search import grace_period, pruning_searcher, search_scheduler

    asha = search_scheduler(200)   # rungs from the grace period (a quarter) on; none before it
    assert (asha._max_t, asha._time_attr) == (200, "epoch")
    assert sorted(m for m, _ in asha._brackets[0]._rungs) == [50, 100, 200]
    assert grace_period(3, 0.1) == 1
    with pytest.raises(Exception, match="grace_fraction"):
        search_scheduler(200, 0.0)
    searcher = pruning_searcher(10, space={"lam": tune.uniform(0, 1)}, metric="acc", mode="max", seed=0)
    for tid in ("stopped", "full", "broken"):
        searcher.suggest(tid)
    searcher.on_trial_complete("stopped", result={"acc": 0.9, "epoch": 3})     # ASHA stopped it at epoch 3
    searcher.on_trial_complete("full", result={"acc": 0.5, "epoch": 10})
    searcher.on_trial_complete("broken", result=None, error=True)
    states = [t.state for t in searcher._ot_study.trials]
    assert states == [optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.COMPLETE,
                      optuna.trial.TrialState.FAIL]
    assert searcher._ot_study.best_value == 0.5          # the truncated 0.9 is not a candidate


@pytest.mark.slow
def test_a_failed_logits_task_ends_its_students_at_once(tmp_path):
    store = tmp_path / "store"
    r = sweep("table2.py", store, "--temperatures", "3", "10", "--epochs", "1",
              faults={"fail_logits": {"key": "teacher-digits-resnet20-s0"}})
    out = r.stdout + r.stderr
    assert r.returncode == 1, out[-3000:]
    lines = [x for x in out.splitlines() if x.startswith("FAILED trial kd-")]
    assert len(lines) == 2 and all("logits of teacher teacher-digits-resnet20-s0-paper failed: " in x
                                   and "InjectedFault" in x for x in lines), lines
    assert "logits: FAILED teacher-digits-resnet20-s0-paper" in out
    st = S.Storage(str(store))
    assert [x["key"] for x in st.records()] == ["teacher-digits-resnet20-s0"]   # no student trial started


def test_dry_run_plans_longest_first_and_starts_nothing(tmp_path):
    store = tmp_path / "never"
    cmd = [sys.executable, os.path.join(ROOT, "sweeps", "paper.py"), "--dry-run", "--storage", str(store)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "nothing is started" in out and not store.exists()
    assert "asks for 1 CPU and" in out
    teachers = out[out.index("stage teachers"):out.index("stage students")]
    students = out[out.index("stage students"):out.index("attacks:")]
    assert teachers.count(" epochs ") == 10 and teachers.splitlines()[1].split()[0] == "teacher-cifar10-resnet110-s0"
    assert students.count(" epochs ") == 65 and students.splitlines()[1].split()[0] == "node-cifar10-t500-s0"   # not last
    assert "node-svhn-t500" not in out                                      # Table 3 is CIFAR10 only
    assert "GPU time idle" in out


def test_sigint_watch_sees_a_ctrl_c_that_tunes_handler_swallowed_and_restores_the_handler(monkeypatch):
    """Tune's own SIGINT handler (the one fit() installs) stops the experiment and returns normally:
    the watch is how the driver knows the stage was interrupted rather than failed."""
    from ray.tune.tune import _setup_signal_catching

    from nodekd_ray.orchestration.interrupt import SigintWatch

    before = signal.getsignal(signal.SIGINT)
    with SigintWatch() as watch:  # a fit() without Ctrl-C leaves Tune's handler installed
        finished = _setup_signal_catching()
    assert not watch.seen and not finished.is_set()
    assert signal.getsignal(signal.SIGINT) is before

    with SigintWatch() as watch:  # a fit() that Tune ended on Ctrl-C
        interrupted = _setup_signal_catching()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)
    assert interrupted.is_set() and watch.seen
    assert signal.getsignal(signal.SIGINT) is before

    monkeypatch.setenv("TUNE_DISABLE_SIGINT_HANDLER", "1")  # Tune catches nothing: Python's default
    with pytest.raises(KeyboardInterrupt):
        with SigintWatch() as watch:
            _setup_signal_catching()
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
    assert watch.seen and signal.getsignal(signal.SIGINT) is before


def test_a_ctrl_c_swallowed_inside_ray_still_stops_the_sweep(tmp_path, monkeypatch):
    """A KeyboardInterrupt raised inside Ray's start-up can be lost there: the sweep then ran to the
    end with exit 0 (test_ctrl_c_while_starting_is_one_line_and_releases_the_lock, about 1 in 20
    tries). Here connect() swallows it the same way; the sweep must still stop before its next step,
    release its lock and put the SIGINT handler back, also where this process started with SIGINT
    ignored (a test run that a script put in the background with `&`)."""
    from nodekd_ray.orchestration import driver as D

    steps = []

    def connect(*args, **kw):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        except KeyboardInterrupt:
            steps.append("swallowed")
        return False

    def request(self, *args, **kw):
        steps.append("went on")
        raise RuntimeError("the sweep went on past the Ctrl-C")

    monkeypatch.setattr(D, "connect", connect)
    monkeypatch.setattr(D.Resources, "request", request)
    spec = S.SweepSpec("table1", datasets=("digits",), teachers=("resnet20",), baseline_horizons=(1.0,))
    store = tmp_path / "store"
    for start in (signal.default_int_handler, signal.SIG_IGN):
        before = signal.signal(signal.SIGINT, start)
        try:
            steps.clear()
            with pytest.raises(KeyboardInterrupt):
                D.run_sweep([spec], S.Settings(), str(store), address="local")
            assert steps == ["swallowed"], start
            assert not (store / "lock.json").exists() and signal.getsignal(signal.SIGINT) is start
        finally:
            signal.signal(signal.SIGINT, before)


@pytest.mark.slow
def test_resume_after_a_stop_before_tune_saved_its_experiment_state(tmp_path):
    """A driver stopped a moment after a stage's Tune experiment began (a `ray job stop`, as the Jobs API
    test met it in a fresh clone) leaves tuner.pkl without the experiment's or the grid's saved state.
    Tune's restore then rebuilt the grid from an empty param space and failed the resumed run with
    KeyError: 'job'. The resume now runs those trials in a new experiment."""
    store = tmp_path / "store"
    r = sweep("figure1.py", store, *EPOCH1, "--temperatures", "10", "--attacks", "pgd")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    st = S.Storage(str(store))
    kd = "kd-digits-t1-resnet20-T10-lam0.9-s0"
    os.remove(st.record(kd))                       # the student the stopped run had not finished
    os.remove(st.model(kd))
    exp = os.path.join(str(store), "tune", "figure1-students")
    for name in os.listdir(exp):                   # what a stop as the experiment began leaves: tuner.pkl
        if name.startswith(("experiment_state-", "basic-variant-state-")):
            os.remove(os.path.join(exp, name))
    assert os.path.exists(os.path.join(exp, "tuner.pkl"))
    r = sweep("figure1.py", store, *EPOCH1, "--temperatures", "10", "--attacks", "pgd", "--resume")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "figure1-students: the Tune experiment in" in out and "saved no state" in out
    assert st.read_record(kd)["status"] == "done" and os.path.isdir(exp + "-2")


def test_the_stage_progress_line_counts_and_estimates():
    """stage_progress: counts, epochs and an ETA from the measured rate, printed on starts, completions and
    failures, and at most every every_s seconds as epochs come in."""
    from types import SimpleNamespace

    from nodekd_ray.orchestration.progress import stage_progress

    lines = []
    cb = stage_progress("students", {"a": 4, "b": 4, "c": 2}, lines.append, every_s=3600)
    trial = {k: SimpleNamespace(config={"job": {"key": k}}) for k in "abc"}
    cb.on_trial_start(0, [], trial["a"])
    assert lines[-1] == "students: 0/3 done, 1 running, 0 failed; 0/10 epochs; ETA after the first epoch"
    cb.t0 -= 100                                  # 100 s have passed
    cb.on_trial_result(0, [], trial["a"], {"epoch": 2})
    assert len(lines) == 1                        # within every_s: no line for a result
    cb.on_trial_complete(0, [], trial["a"])       # a: 4 epochs in 100 s, 6 left: 150 s
    assert lines[-1] == "students: 1/3 done, 0 running, 0 failed; 4/10 epochs; about 2m30s left"
    cb.on_trial_error(0, [], trial["c"])
    assert lines[-1].startswith("students: 1/3 done, 0 running, 1 failed; 4/10 epochs")
    # Tune pickles its callbacks with the experiment's state: a log function that cannot be pickled is left out
    import ray.cloudpickle as cloudpickle

    class Unpicklable:
        def __call__(self, line):
            lines.append(line)

        def __reduce__(self):
            raise TypeError("cannot pickle this log")

    again = cloudpickle.loads(cloudpickle.dumps(stage_progress("students", {"a": 4}, Unpicklable())))
    assert again.running == set() and callable(again._line)


def test_the_search_progress_line_counts_trials_and_bounds_the_eta():
    """search_progress: trials that ended at full length and those ASHA stopped, the best full-length accuracy
    (a truncated trial's is not a candidate, as in the search's answer), and an upper-bound ETA."""
    from types import SimpleNamespace

    import ray.cloudpickle as cloudpickle

    from nodekd_ray.orchestration.progress import search_progress

    lines = []
    cb = search_progress("lam-T", 3, 4, lines.append, every_s=3600)
    t = {k: SimpleNamespace(trial_id=k, config={"lam": lam, "T": T}) for k, lam, T in
         (("a", 0.5, 3.0), ("b", 0.9, 10.0), ("c", 0.1, 20.0))}
    cb.on_trial_start(0, [], t["a"])
    cb.on_trial_start(0, [], t["b"])
    assert lines[-1] == ("lam-T: 0/3 trials ended (0 full length, 0 stopped early), 2 running, 0 failed; "
                         "no result yet; ETA after the first epoch")
    cb.t0 -= 60                                                   # 60 s have passed
    cb.on_trial_result(0, [], t["b"], {"epoch": 2, "test_accuracy": 0.99})   # truncated: not a candidate yet
    cb.on_trial_result(0, [], t["a"], {"epoch": 4, "test_accuracy": 0.80})
    cb.on_trial_complete(0, [], t["a"])
    # 6 epochs in 60 s; left: b's 2 + c's 4 = 6 epochs -> at most 60 s
    assert lines[-1] == ("lam-T: 1/3 trials ended (1 full length, 0 stopped early), 1 running, 0 failed; "
                         "best full-length 80.0% (lam 0.50, T 3.00); at most about 60s left")
    cb.on_trial_complete(0, [], t["b"])                           # ASHA stopped b at epoch 2
    cb.on_trial_error(0, [], t["c"])
    assert lines[-1].startswith("lam-T: 3/3 trials ended (1 full length, 1 stopped early), 0 running, 1 failed; "
                                "best full-length 80.0% (lam 0.50, T 3.00)")
    again = cloudpickle.loads(cloudpickle.dumps(search_progress("lam-T", 3, 4, lambda line: None)))
    assert again.best is None and callable(again._line)


def test_the_attack_stage_eta_comes_from_the_measured_rate():
    from nodekd_ray.orchestration.driver import _eta

    assert _eta(3, 1, 10.0) == "about 30s left"          # one task in 10 s, three to go
    assert _eta(6, 4, 600.0) == "about 15m left"
    assert _eta(2, 0, 5.0) == "ETA after the first task" and _eta(0, 5, 50.0) == "none left"
