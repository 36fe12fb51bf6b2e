"""Cost planning (issue 11): measured costs files, seconds per epoch from records, GPU-hours in --dry-run."""
import json
import os
import subprocess
import sys

import pytest

from nodekd_ray.costs import costs_from_records, job_seconds, load_costs
from nodekd_ray.errors import ConfigError
from nodekd_ray.sweep import AttackJob, Settings, StudentJob, TeacherJob

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(tmp_path, name, obj):
    p = tmp_path / name
    p.write_text(json.dumps(obj))
    return str(p)


def test_costs_files_merge_and_bad_fields_are_one_line(tmp_path):
    a = _write(tmp_path, "a.json", {"device": "gpu A", "rates": {"student": 100, "teacher": 20}, "nfe_forward": {"1": 26}})
    b = _write(tmp_path, "b.json", {"rates": {"student": 150}, "seconds_per_epoch": {"k": 3.5}})
    c = load_costs([a, b])
    assert c["device"] == "gpu A"
    assert c["rates"] == {"student": 150.0, "teacher": 20.0}       # the later file wins
    assert c["nfe_forward"] == {"1.0": 26.0} and c["seconds_per_epoch"] == {"k": 3.5}
    for bad, field in [({"rates": {"student": -1}}, "rates.student"), ({"rates": {"gpu": 1}}, "rates.gpu"),
                       ({"nfe_forward": {"1": "x"}}, "nfe_forward.1"), ({"hours": 1}, "hours"),
                       ({"seconds_per_epoch": {"k": float("inf")}}, "seconds_per_epoch.k")]:
        with pytest.raises(ConfigError) as e:
            load_costs([_write(tmp_path, "bad.json", bad)])
        assert field in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not JSON"):
        load_costs([str(tmp_path / "junk.json")])


def test_seconds_per_epoch_and_nfe_come_from_finished_records():
    recs = [
        {"key": "a", "status": "done", "config": {"node": {"t1": 100.0}},
         "history": [{"seconds": 99.0, "nfe_forward": 80}, {"seconds": 10.0, "nfe_forward": 50},
                     {"seconds": 12.0, "nfe_forward": 60}, {"seconds": 11.0, "nfe_forward": 70}]},
        {"key": "b", "status": "done", "config": {}, "history": [{"seconds": 5.0}]},
        {"key": "c", "status": "running", "history": [{"seconds": 1.0}, {"seconds": 1.0}]},
    ]
    c = costs_from_records(recs)
    assert c["seconds_per_epoch"] == {"a": 11.0, "b": 5.0}          # epoch 1 (warm-up) left out when there are more
    assert c["nfe_forward"] == {"100.0": 60.0}


def test_job_seconds_measured_or_from_flops_over_the_rate():
    settings = Settings(teacher={"epochs": 4}, student={"epochs": 3, "width": 256})
    teacher = TeacherJob("cifar10", "resnet20")
    student = StudentJob("cifar10", 100.0, teacher="resnet20", T=10.0, lam=0.9, logits_mode="paper")
    costs = {"rates": {"teacher": 2.0, "student": 8.0}, "nfe_forward": {"100.0": 40.0},
             "seconds_per_epoch": {teacher.key: 7.0}}
    assert job_seconds(teacher, settings, costs) == (28.0, "measured")
    # independent: 3 (fwd+bwd) x 3 epochs x 50,000 images x 1.2 GFLOP x (256/512)^2 x 40 NFE, at 8 TFLOP/s
    s, how = job_seconds(student, settings, costs)
    assert how == "rate" and s == pytest.approx(3 * 3 * 50_000 * 1.2 * 0.25 * 40 / 8e3)
    attack = AttackJob(student.key, "cifar10", "pgd", (0, 8))
    s_att, _ = job_seconds(attack, Settings(attack_images=100, student={"width": 256}), costs, student)
    assert s_att == pytest.approx(2 * 20 * 100 * 2 * 1.2 * 0.25 * 40 / 8e3)
    with pytest.raises(ConfigError, match="rates.teacher"):
        job_seconds(TeacherJob("svhn", "resnet20"), settings, {**costs, "rates": {"student": 8.0}})


def test_dry_run_prints_gpu_hours_from_a_costs_file(tmp_path):
    costs = _write(tmp_path, "c.json", {"device": "cuda TEST", "rates": {"student": 100.0, "teacher": 10.0}})
    cmd = [sys.executable, os.path.join(ROOT, "sweeps", "table1.py"), "--dry-run", "--storage", str(tmp_path / "s"),
           "--costs", costs, "--plan-gpus", "4"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    line = next(l for l in r.stdout.splitlines() if l.startswith("cost on cuda TEST"))
    assert "GPU-hours" in line and "makespan on 4 GPUs" in line
    total = float(line.split(": ")[1].split(" GPU-hours")[0])
    parts = [float(line.split(f"{k} ")[1].split(",")[0].split(")")[0]) for k in ("teachers", "students", "attacks")]
    assert total == pytest.approx(sum(parts), abs=0.15) and total > 0
    bad = _write(tmp_path, "bad.json", {"rates": {"student": 0}})
    r = subprocess.run(cmd[:-3] + [bad], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "rates.student" in r.stderr
    assert not (tmp_path / "s").exists()


def test_nodekd_costs_writes_a_file_that_dry_run_reads(tmp_path, capsys):
    from nodekd_ray.cli import main
    from nodekd_ray.storage import Storage

    store = Storage(str(tmp_path / "run"))
    store.write_record("teacher-digits-resnet20-s0", {
        "key": "teacher-digits-resnet20-s0", "status": "done", "device": "cuda TEST", "config": {},
        "history": [{"seconds": 9.0}, {"seconds": 2.0}, {"seconds": 4.0}]})
    out = str(tmp_path / "costs.json")
    assert main(["costs", str(tmp_path / "run"), "--out", out]) == 0
    c = load_costs([out])
    assert c["device"] == "cuda TEST" and c["seconds_per_epoch"] == {"teacher-digits-resnet20-s0": 3.0}
    assert main(["costs", str(tmp_path / "nothing")]) == 2
    assert "no such folder" in capsys.readouterr().err


@pytest.mark.slow
def test_check_gpu_passes_the_real_model_and_fails_a_broken_time_response(monkeypatch):
    """benchmarks/check_gpu.py (run on an H100 for the README) against its fp64 reference, here at
    smoke size on the CPU: the options pass, and an aligned conv whose time response is dropped
    fails (the concatenation form, which does not use it, still passes)."""
    import importlib.util
    from types import SimpleNamespace

    import torch

    from nodekd_ray.models import ODEFunc

    spec = importlib.util.spec_from_file_location("check_gpu", os.path.join(ROOT, "benchmarks", "check_gpu.py"))
    check_gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check_gpu)
    args = SimpleNamespace(width=32, stem=8, batch=4, t1=1.0)
    rows = check_gpu.check(args, torch.device("cpu"), 0)   # PyTorch's ops stand in for the Triton kernels here
    assert [r[1] for r in rows] == list(check_gpu.OPTIONS) and all(r[-1] for r in rows)
    assert rows[1][2]["logits"] < 1e-6            # aligned fp32 against fp64
    # the kernels themselves (interpreted: about 10 s a row here) in the two rows that combine the most:
    # bf16 with nodekd's dopri5, and recompute. tests/test_fused_norm.py runs them in the student with
    # each option against PyTorch's norms and float64
    with monkeypatch.context() as m:
        m.setattr(check_gpu, "OPTIONS", {k: check_gpu.OPTIONS[k] for k in ("bf16+triton+nodekd", "tf32+triton+recompute")})
        m.setenv("TRITON_INTERPRET", "1")
        assert all(r[-1] for r in check_gpu.check(args, torch.device("cpu"), 0))

    real = ODEFunc._aligned_weights
    monkeypatch.setattr(ODEFunc, "_aligned_weights", lambda self, i, conv, h, **kw: (
        lambda w, r: (w, 0 * r))(*real(self, i, conv, h, **kw)))
    ok = {r[1]: r[-1] for r in check_gpu.check(args, torch.device("cpu"), 0)}
    assert ok == {"fp32-concat": True, "fp32": False, "tf32": False, "bf16": False, "bf16+cl": False,
                  "tf32+nodekd": False, "tf32+recompute": False, "bf16+recompute": False,
                  "tf32+triton": False, "bf16+triton": False, "bf16+triton+cl": False, "bf16+triton+nodekd": False,
                  "tf32+triton+recompute": False, "tf32+nodekd+noise": False, "bf16+nodekd+noise": False,
                  "bf16+triton+nodekd+noise": False}   # noise-aware: its fp32 reference is the concatenation form, f is not


@pytest.mark.slow
def test_gpu_pending_runs_every_step_and_goes_on_past_a_failed_one(tmp_path):
    """benchmarks/gpu_pending.sh, the one command a GPU lease runs, at smoke sizes on the CPU: its option
    names are the scripts' own, each step writes its file as it runs, and a step that fails (check_gpu,
    made to exit 1 here) is reported in status.txt without stopping the steps after it. Its bench_student
    step is also the test of bench_student.py --smoke --memory --out."""
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\ncase "$1" in *check_gpu.py) echo "1 checks FAILED"; exit 1;; esac\n'
                    f'exec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = dict(os.environ, GPU_PENDING_SMOKE="1", PYTHONPATH=ROOT)
    r = subprocess.run(["bash", os.path.join("benchmarks", "gpu_pending.sh"), str(out), str(fake)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=2100)   # the smoke run's 4 x 470 s of limits
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    status = (out / "status.txt").read_text()
    assert "check_gpu: exit 1" in status and "1 checks FAILED" in (out / "check_gpu.txt").read_text()
    for name in ("bench_student", "bench_step_control", "bench_norm", "bench_solver"):
        assert f"{name}: ok" in status, status
    student = (out / "bench_student.txt").read_text()
    assert "failed" not in student and "bf16+triton+nodekd+noise" in student   # every option ran
    assert "bf16: plain / noise-aware forward NFE" in (out / "bench_step_control.txt").read_text()
    assert "saved for backward" in student and "x base" in student       # --memory, ratios to the fp32 path
    assert "operations of one f evaluation" in (out / "bench_norm.txt").read_text()
    assert "torch " in (out / "env.txt").read_text()
    # bench_student's --out file is a costs file: its rates turn a plan into GPU-hours
    c = load_costs([str(out / "rates.json")])
    assert c["device"] == "cpu" and c["rates"]["student"] > 0 and c["rates"]["teacher"] > 0
    options = json.loads((out / "rates.json").read_text())["options"]
    assert options["tf32"]["nfe_forward"] >= 2 and options["fp32-concat"]["images_per_s"] > 0
