"""The sweep layer without Ray: the grid, keys, settings, training records, attack Parquet, report."""
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from nodekd_ray import report as R
from nodekd_ray import sweep as S
from nodekd_ray.errors import ConfigError

TINY = S.Settings(teacher={"epochs": 2, "batch_size": 64}, student={"epochs": 2, "batch_size": 64, "width": 8,
                                                                     "stem_channels": 8},
                  attack_images=40, attack_batch_size=40)


def test_the_paper_grids_have_the_papers_sizes():
    p = S.plan([S.PRESETS["table2"]])
    assert len(p.students) == 60 and len(p.teachers) == 10 and not p.attacks
    assert len({j.key for j in p.students}) == 60
    p1 = S.plan([S.PRESETS["table1"]])
    assert len(p1.teachers) == 10 and sorted({j.t1 for j in p1.students}) == [1.0, 100.0]
    both = S.plan([S.PRESETS["table1"], S.PRESETS["table2"]])
    assert len(both.teachers) == 10 and len(both.students) == 64  # teachers shared, not duplicated
    p3 = S.plan([S.PRESETS["table3"]])
    assert [j.key for j in p3.students] == ["node-cifar10-t500-s0"]
    assert sorted({e for a in p3.attacks for e in a.eps_255}) == [0, 8, 12, 16, 20]
    f = S.plan([S.PRESETS["figure1"]], eps_per_task=4)
    # teacher + 2 baselines + 2 KD students, per data set, 2 attacks, 21 eps in chunks of 4 (6 chunks)
    assert len(f.attacks) == 2 * 5 * 2 * 6
    covered = {(a.model_key, a.attack): set() for a in f.attacks}
    for a in f.attacks:
        covered[(a.model_key, a.attack)] |= set(a.eps_255)
    assert all(v == set(map(float, range(21))) for v in covered.values())


@pytest.mark.parametrize("kw, field", [
    (dict(kd_teachers=("resnet21",)), "teacher"), (dict(temperatures=(0.0,), kd_teachers=("resnet20",)), "T"),
    (dict(lam=1.5), "lam"), (dict(kd_horizons=(-1.0,), kd_teachers=("resnet20",)), "horizon"),
    (dict(datasets=("mnist",)), "dataset"), (dict(attacks=("cw",)), "attack"), (dict(eps_255=(300,)), "eps"),
])
def test_a_bad_grid_names_the_field(kw, field):
    with pytest.raises(ConfigError) as e:
        S.plan([S.SweepSpec("bad", **kw)])
    assert e.value.field == field


def test_settings_are_checked_and_a_folder_keeps_its_own(tmp_path):
    with pytest.raises(ConfigError, match="student"):
        S.Settings(student={"widht": 3}).validate()
    with pytest.raises(ConfigError, match="attack_images"):
        S.Settings(attack_images=0).validate()
    st = S.Storage(str(tmp_path))
    st.check_settings(TINY, create=True)
    st.check_settings(TINY, create=True)
    other = S.Settings(teacher={"epochs": 3})
    with pytest.raises(ConfigError, match="storage.*teacher"):
        st.check_settings(other, create=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic_module):
    """A teacher, its paper logits, a KD student and a no-KD student in one storage folder."""
    st = S.Storage(str(tmp_path_factory.mktemp("store")))
    data = synthetic_module
    tj = S.TeacherJob("synthetic", "resnet20")
    reports = []
    S.run_training(tj, TINY, st, data, report=lambda m, s: reports.append(m["epoch"]))
    table = S.logit_table(tj, "paper", TINY, st, data)
    kd = S.StudentJob("synthetic", 1.0, 0, "resnet20", 3.0, 0.9, "paper")
    S.run_training(kd, TINY, st, data, table=table)
    base = S.StudentJob("synthetic", 1.0, 0)
    S.run_training(base, TINY, st, data)
    return st, data, tj, kd, base, reports


@pytest.fixture(scope="module")
def synthetic_module():
    from nodekd_ray.data import load_dataset

    return load_dataset("synthetic", synthetic_sizes=(128, 64))


def test_training_records_and_logits(trained):
    st, data, tj, kd, base, reports = trained
    assert reports == [1, 2]
    rec = st.read_record(kd.key)
    assert rec["status"] == "done" and rec["attempts"] == 1 and rec["started_from_epoch"] == [0]
    assert rec["final"]["teacher_forwards"] == 0 and rec["final"]["teacher_checkpoint_loads"] == 0
    assert len(rec["history"]) == 2 and os.path.exists(st.model(kd.key))
    side = json.load(open(st.logits(tj.key, "paper", "json")))
    assert side["teacher_forward_images"] == 128 and side["shape"] == [128, 10]
    # a second request reads the cached table: same numbers, no recomputation
    mtime = os.path.getmtime(st.logits(tj.key, "paper"))
    again = S.logit_table(tj, "paper", TINY, st, data)
    assert os.path.getmtime(st.logits(tj.key, "paper")) == mtime
    assert np.array_equal(again, np.load(st.logits(tj.key, "paper")))
    # TensorBoard: per-trial scalars every epoch, and the trial's hyperparameters
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(st.tensorboard(kd.key))  # the folder: every event file in it
    ev.Reload()
    tags = ev.Tags()["scalars"]
    for t in ("loss", "test_accuracy", "nfe_forward", "nfe_backward", "lr"):
        assert f"node1-kd/{t}" in tags and len(ev.Scalars(f"node1-kd/{t}")) == 2
    hp = EventAccumulator(os.path.join(st.tensorboard(kd.key), "hparams"))
    hp.Reload()
    assert "hparam/test_accuracy" in hp.Tags()["scalars"]
    assert "_hparams_/session_start_info" in hp.Tags()["tensors"] or hp.PluginTagToContent("hparams")


def test_an_ode_failure_is_recorded_and_not_retried(trained, monkeypatch):
    st, data, *_ = trained
    job = S.StudentJob("synthetic", 2.0, 0)
    bad = S.Settings(**{**TINY.to_dict(), "student": {**TINY.student, "max_num_steps": 1}})
    with pytest.raises(S.ODESolveError):
        S.run_training(job, bad, st, data)
    rec = st.read_record(job.key)
    assert rec["status"] == "failed" and "max_num_steps" in rec["error"] and rec["deterministic"]
    with pytest.raises(S.ODESolveError, match="not retried"):
        S.run_training(job, bad, st, data)
    assert st.read_record(job.key)["attempts"] == 1


@pytest.fixture(scope="module")
def attacked(trained):
    """Three attack files on the trained models: a fixture, not a test's side effect, because pytest-xdist
    hands a module's tests to both workers (the report test ran once where no attack had, CI at 4b98bb1)."""
    st, data, tj, kd, base, _ = trained
    jobs = [S.AttackJob(base.key, "synthetic", "pgd", (0.0, 4.0)), S.AttackJob(base.key, "synthetic", "pgd", (8.0,)),
            S.AttackJob(tj.key, "synthetic", "mifgsm", (0.0, 8.0))]
    return [S.run_attack(j, TINY, st, data[1]) for j in jobs]


def test_attack_files_round_trip_with_the_schema(trained, attacked):
    st, data, tj, kd, base, _ = trained
    for path in attacked:
        assert pq.read_schema(path).equals(S.ATTACK_FILE_SCHEMA)
    t = S.read_attacks(st)
    assert t.schema.equals(S.ATTACK_SCHEMA) and t.num_rows == 5
    rows = t.to_pylist()
    node = sorted((r for r in rows if r["model_key"] == base.key), key=lambda r: r["eps_255"])
    assert [r["eps_255"] for r in node] == [0.0, 4.0, 8.0] and [r["steps"] for r in node] == [0, 5, 10]
    assert all(r["n_images"] == 40 and 0 <= r["robust_accuracy"] <= r["clean_accuracy"] <= 1 for r in rows)
    assert node[0]["robust_accuracy"] == node[0]["clean_accuracy"]  # eps = 0 is the clean accuracy
    assert node[1]["nfe_per_image"] > node[0]["nfe_per_image"] > 0  # an attack costs ODE evaluations
    assert {r["attack"] for r in rows} == {"pgd", "mifgsm"} and {r["dataset"] for r in rows} == {"synthetic"}
    # the clean accuracy of the attacked subset matches an independent evaluation
    from nodekd_ray.checkpoints import load_checkpoint
    import torch

    model, _ = load_checkpoint(st.model(base.key))
    x = data[1].images[:40].float() / 255
    with torch.no_grad():
        acc = float((model(x).argmax(1) == data[1].labels[:40]).float().mean())
    assert node[0]["clean_accuracy"] == pytest.approx(acc)


def test_report_tables_and_figure_from_records_and_parquet(trained, attacked):
    st, *_ = trained
    paths = R.write_report(st.root)
    assert set(paths) == {"Table 1", "Table 2", "Table 3", "Attacks", "Audit", "Figure 1"}
    assert "## Verdicts" in open(paths["Audit"]).read()
    assert open(paths["Figure 1"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    t2 = open(paths["Table 2"]).read()
    kd_acc = st.read_record("kd-synthetic-t1-resnet20-T3-lam0.9-s0")["test_accuracy"]
    assert f"{100 * kd_acc:.2f}" in t2 and "ResNet20" in t2


def test_report_puts_the_papers_numbers_beside_ours():
    recs = [{"key": f"teacher-cifar10-resnet44-s{s}", "status": "done", "kind": "teacher", "dataset": "cifar10",
             "model": "resnet44", "test_accuracy": a} for s, a in enumerate((0.90, 0.92))]
    recs += [{"key": "kd", "status": "done", "kind": "node_kd", "dataset": "cifar10", "model": "node", "t1": 1.0,
              "teacher": "resnet44", "T": 10.0, "lam": 0.9, "logits_mode": "paper", "test_accuracy": 0.8}]
    recs += [{"key": "n500", "status": "done", "kind": "node", "dataset": "cifar10", "model": "node", "t1": 500.0,
              "test_accuracy": 0.7}]
    t1 = R.table1(recs)
    assert "91.00 ± 1.41 (90.32)" in t1 and "— (63.45)" in t1
    assert "80.00 (88.03)" in R.table2(recs)
    att = [{"attack": "pgd", "model_key": "n500", "eps_255": 8.0, "robust_accuracy": 0.25}]
    assert "70.00 (69.94)" in R.table3(recs, att) and "25.00 (25.07)" in R.table3(recs, att)


def test_cluster_config_structure():
    root = os.path.join(os.path.dirname(__file__), "..")
    cfg = yaml.safe_load(open(os.path.join(root, "cluster", "gpu.yaml")))
    for k in ("cluster_name", "provider", "auth", "available_node_types", "head_node_type", "file_mounts",
              "setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        assert k in cfg, k
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    workers = [t for n, t in types.items() if n != cfg["head_node_type"]]
    assert workers and all(t["max_workers"] >= 1 and t["min_workers"] == 0 for t in workers)
    assert cfg["max_workers"] >= max(t["max_workers"] for t in workers)
    assert {"./nodekd_ray", "./sweeps", "./pyproject.toml"} <= set(cfg["file_mounts"].values())  # what installs
    setup = " ".join(cfg["head_setup_commands"] + cfg["worker_setup_commands"])
    assert "pip install" in setup and "nodekd download cifar10 svhn" in " ".join(cfg["head_setup_commands"])
    assert "torch==" in setup and "torchvision==" in setup  # a matched pair
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head  # the dashboard is not opened to the internet
    assert "dashboard-host=0.0.0.0" not in yaml.safe_dump(cfg)
    # the sweep scripts the config's comments name exist
    for script in ("table1", "table2", "table3", "figure1", "search_lambda_T", "paper"):
        assert os.path.exists(os.path.join(root, "sweeps", f"{script}.py"))
