import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch

from nodekd_ray.cli import main
from nodekd_ray.checkpoints import build_model, save_checkpoint

SMALL = ["--width", "16", "--stem-channels", "8"]


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ck") / "teacher.pt")
    torch.manual_seed(0)
    save_checkpoint(path, build_model("resnet20"), arch="resnet20", num_classes=10, mean=[0.5] * 3, std=[0.25] * 3,
                    meta={"config": {"dataset": "synthetic"}})
    return path


def bad_cases(tmp, teacher):
    corrupt = os.path.join(tmp, "corrupt.pt")
    with open(corrupt, "wb") as f:
        f.write(b"\x00not a checkpoint")
    return [
        (["train-teacher", "--dataset", "mnist"], "dataset"),
        (["train-teacher", "--dataset", "synthetic", "--model", "resnet18"], "model"),
        (["train-student", "--no-kd", "--dataset", "synthetic", "--solver", "rk45"], "solver"),
        (["train-student", "--no-kd", "--dataset", "synthetic", "--solver", "rk4", "--node", "solver_impl=nodekd"],
         "solver_impl"),
        (["train-student", "--no-kd", "--dataset", "synthetic", "--recompute", "--node", "time_conv=concat"], "recompute"),
        (["train-student", "--no-kd", "--dataset", "synthetic", "--node", "graph_inputs=some"], "graph_inputs"),
        (["train-student", "--no-kd", "--dataset", "synthetic", "--node", "norm_impl=cudnn"], "norm_impl"),
        (["train-student", "--no-kd", "--dataset", "synthetic", "--node", "precision=bf16", "--node",
          "step_control=noise-aware", "--node", "solver_impl=torchdiffeq"],
         "step_control"),   # needs --solver-impl nodekd
        (["train-student", "--no-kd", "--dataset", "synthetic", "--node", "norm_impl=triton", "--device", "cpu"],
         "norm_impl"),   # the Triton kernels run on CUDA devices only
        (["train-student", "--teacher", teacher, "--dataset", "synthetic", "--lam", "1.5"], "lam"),
        (["train-student", "--teacher", teacher, "--dataset", "synthetic", "--T", "0"], "T"),
        (["train-student", "--no-kd", "--dataset", "synthetic", "--t1", "0"], "t1"),
        (["train-student", "--dataset", "synthetic"], "teacher"),
        (["train-student", "--teacher", corrupt, "--dataset", "synthetic"], "checkpoint"),
        (["train-student", "--teacher", teacher, "--dataset", "digits"], "teacher"),  # trained on synthetic
        (["attack", "--checkpoint", teacher, "--dataset", "synthetic", "--eps", "0,1.5"], "eps"),
        (["attack", "--checkpoint", teacher, "--dataset", "synthetic", "--attack", "cw"], "attack"),
        (["attack", "--checkpoint", os.path.join(tmp, "missing.pt"), "--dataset", "synthetic"], "checkpoint"),
        (["train-teacher", "--dataset", "cifar10", "--data-root", os.path.join(tmp, "empty")], "data"),
        (["train-teacher", "--dataset", "svhn", "--data-root", os.path.join(tmp, "empty")], "data"),
    ]


@pytest.mark.parametrize("argv, field", [(["report", "/no/such/results"], "results_dir"),
                                         (["download", "mnist"], "dataset")])
def test_report_and_download_refuse_bad_input(argv, field, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"nodekd: error: {field}:"), err


def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, teacher_ckpt, capsys):
    for argv, field in bad_cases(str(tmp_path), teacher_ckpt):
        out = str(tmp_path / "out.file")
        try:
            rc = main(argv + ["--out", out] + SMALL * (argv[0] == "train-student"))
        except SystemExit as e:      # refused by the parser (a value outside a field's choices)
            rc = e.code
        err = capsys.readouterr().err.strip()
        assert rc == 2, argv
        assert len(err.splitlines()) == 1 and err.startswith(f"nodekd: error: {field}:"), (argv, err)
        assert not os.path.exists(out), argv
    assert sorted(os.listdir(tmp_path)) == ["corrupt.pt"]  # no temporary files left either


def test_argparse_errors_are_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train-student", "--T", "hot", "--out", "x"])
    assert e.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


def test_existing_output_is_not_replaced_without_force(tmp_path, teacher_ckpt, capsys):
    out = tmp_path / "a.parquet"
    out.write_text("keep me")
    assert main(["attack", "--checkpoint", teacher_ckpt, "--dataset", "synthetic", "--out", str(out)]) == 2
    assert out.read_text() == "keep me" and "--force" in capsys.readouterr().err


def test_help_explains_every_option(capsys):
    import argparse

    from nodekd_ray.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for cmd, parser in sub.choices.items():
        for action in parser._actions:
            assert action.help and len(action.help) > 8, (cmd, action.dest)
        with pytest.raises(SystemExit) as e:   # in this process: a subprocess per command took 22 s
            main([cmd, "--help"])
        out = capsys.readouterr().out
        assert e.value.code == 0 and ("--dataset" in out or cmd in ("report", "download", "verify", "costs")), cmd
        assert parser.description and parser.description.split()[0] in out
    r = subprocess.run([sys.executable, "-m", "nodekd_ray.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and all(cmd in r.stdout for cmd in sub.choices), r.stdout   # as `python -m` runs it


@pytest.mark.slow
def test_console_script_end_to_end(tmp_path):
    """train-teacher -> train-student (KD) -> attack, through the installed `nodekd` command."""
    exe = os.path.join(os.path.dirname(sys.executable), "nodekd")
    common = ["--dataset", "synthetic", "--limit-test", "32"]
    t, s, a = (str(tmp_path / n) for n in ("t.pt", "s.pt", "a.parquet"))
    run = lambda *args: subprocess.run([exe, *args], capture_output=True, text=True, timeout=600)  # noqa: E731
    r = run("train-teacher", *common, "--epochs", "1", "--limit-train", "128", "--out", t)
    assert r.returncode == 0, r.stderr
    # --crop-padding 1: 18 views of each image for the views table instead of 162 (20,736 teacher forwards
    # took 20 s of this test)
    r = run("train-student", *common, "--teacher", t, "--epochs", "1", "--limit-train", "128", *SMALL,
            "--logits-mode", "views", "--crop-padding", "1", "--speed", "fastest", "--node", "precision=tf32",
            "--recompute", "--node", "recompute=false", "--out", s)
    assert r.returncode == 0, r.stderr
    assert "nfe f/b" in r.stderr
    node = torch.load(s, weights_only=True)["node"]
    # --speed fastest on a CPU (no Triton norms, no graphs), then --node on top of it and of --recompute
    assert (node["precision"], node["solver_impl"], node["step_control"], node["norm_impl"], node["cuda_graphs"],
            node["recompute"]) == ("tf32", "nodekd", "noise-aware", "torch", False, False)
    r = run("attack", *common, "--checkpoint", s, "--attack", "mifgsm", "--eps", "0,2/255,4/255", "--out", a)
    assert r.returncode == 0, r.stderr
    table = pq.read_table(a).to_pandas()
    assert len(table) == 3 * 32 and set(table.steps) == {0, 2, 5} and (table.nfe > 0).all()


def test_study_smoke_writes_its_table(tmp_path):
    """The README's main job in --smoke-test form: trains, attacks, writes study.md/json; a rerun reuses checkpoints."""
    import json

    from nodekd_ray.study import main as study_main

    out = str(tmp_path / "study")
    assert study_main(["--smoke-test", "--out", out]) == 0
    summary = json.load(open(os.path.join(out, "study.json")))
    assert set(summary) >= {"teacher", "node", "node-kd"}
    assert all(0 <= a <= 1 for k in ("teacher", "node", "node-kd") for a in summary[k]["clean"])
    assert "| NODE(1) KD, T=10, paper rule: SGD |" in open(os.path.join(out, "study.md")).read()
    before = os.path.getmtime(os.path.join(out, "node-kd-seed0.pt"))
    assert study_main(["--smoke-test", "--out", out]) == 0
    assert os.path.getmtime(os.path.join(out, "node-kd-seed0.pt")) == before
