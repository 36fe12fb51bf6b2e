"""Configuration files for sweeps: --config FILE.yaml under command-line flags, --print-config that --config reads
back, one-line errors for unknown keys and bad values, and every example in configs/ runs (--dry-run)."""
import dataclasses
import pathlib

import pytest
import yaml

from nodekd_ray.orchestration.entry import main, parse_sweep_args, settings_from_args, sweep_parser
from nodekd_ray.sweep import PRESETS

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _printed(capsys, argv, sweep="table2") -> str:
    assert main([PRESETS[sweep]], argv + ["--print-config"], description="t") == 0
    return capsys.readouterr().out


def test_print_config_round_trips_and_flags_override_the_file(tmp_path, capsys):
    first = _printed(capsys, ["--T", "3", "10", "--speed", "fastest", "--node", "recompute=true", "--eps", "0",
                              "4/255,8/255", "--lr", "0.01"])
    cfg = yaml.safe_load(first)
    assert cfg["sweep"] == "table2" and cfg["T"] == [3.0, 10.0] and cfg["speed"] == "fastest" and cfg["lr"] == 0.01
    assert cfg["node"] == ["recompute=true"] and cfg["eps"] == ["0", "4/255,8/255"]
    assert "temperatures" not in cfg                      # an older name is read, never written
    assert "# table2's grid from these options:" in first and "temperatures: [3.0, 10.0]" in first.splitlines()[-1]
    assert "eps_255: [0.0, 4.0, 8.0]" in first.splitlines()[-1]
    path = tmp_path / "c.yaml"
    path.write_text(first)
    assert _printed(capsys, ["--config", str(path)]) == first                      # read back: the same options
    over = yaml.safe_load(_printed(capsys, ["--config", str(path), "--T", "20", "--lam", "0.5", "0.9"]))
    assert over["T"] == [20.0] and over["lam"] == [0.5, 0.9] and over["speed"] == "fastest"   # flags on top
    # and what the sweep is built from: the file's options reach the settings
    ap = sweep_parser("t")
    args = parse_sweep_args(ap, ["--config", str(path)], ["table2"])
    assert settings_from_args(args).student["speed"] == "fastest"
    assert settings_from_args(args).student["lr"] == settings_from_args(args).teacher["lr"] == 0.01
    # a file written with the older names reads the same
    old = tmp_path / "old.yaml"
    old.write_text("temperatures: [3, 10]\nhorizons: [1]\nteachers: [resnet20]\nattacks: [pgd]\n")
    new = tmp_path / "new.yaml"
    new.write_text("T: [3, 10]\nt1: [1]\nteacher: [resnet20]\nattack: [pgd]\n")
    assert _printed(capsys, ["--config", str(old)]) == _printed(capsys, ["--config", str(new)])


@pytest.mark.parametrize("text, message", [
    ("temperatres: [3]\n", "config.temperatres: unknown option; allowed: "),
    ("speed: fast\n", "config.speed: must be one of reference, default, fastest, got 'fast'"),
    ("T: [a]\n", "config.T: must be float values, got ['a']"),
    ("logits_mode: [paper, views]\n", "config.logits_mode: takes one value, got a list"),
    ("optimizer: rmsprop\n", "config.optimizer: must be one of auto, sgd, adam, got 'rmsprop'"),
    ("resume: maybe\n", "config.resume: must be true or false"),
    ("sweep: table1\n", "config: CFG is for the 'table1' sweep; this script runs table2"),
    ("- a\n- b\n", "config: CFG must be a mapping of option: value, got list"),
    ("a: [\n", "config: CFG is not valid YAML"),
])
def test_a_bad_config_file_is_one_line(tmp_path, capsys, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert main([PRESETS["table2"]], ["--config", str(path), "--dry-run"], description="t") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sweep: error: " + message.replace("CFG", str(path))), err
    if "unknown option" in message:    # the allowed keys are the options' current names
        allowed = err[0].split("allowed: ")[1].split(", ")
        assert "T" in allowed and "t1" in allowed and "temperatures" not in allowed


def test_a_missing_config_file_is_one_line(tmp_path, capsys):
    assert main([PRESETS["table2"]], ["--config", str(tmp_path / "none.yaml")], description="t") == 2
    assert "sweep: error: config: cannot read" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_config_plans(path, tmp_path, capsys):
    sweep = yaml.safe_load(path.read_text())["sweep"]
    store = tmp_path / "store"
    assert main([PRESETS[sweep]], ["--config", str(path), "--dry-run", "--storage", str(store)],
                description="t") == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"plan for {sweep} into {store}" in out and not store.exists()


def _generated(parser, cls, names):
    """The options of ``parser`` generated from ``names`` of ``cls``: each one's help starts with the field's."""
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(cls)}
    actions = {a.dest: a for a in parser._actions if a.help != "==SUPPRESS=="}
    for name in names:
        assert actions[name].help.startswith(fields[name].metadata["help"].split(" (paper: ")[0]), name
    return {name: actions[name] for name in names}


def test_nodekd_options_are_generated_from_the_dataclasses_and_round_trip():
    """nodekd train-teacher's and train-student's options come from RecipeConfig, TeacherConfig, StudentConfig and
    NODEConfig: each default is the dataclass's (they cannot drift apart), each help the field's, and parsed flags
    give the config they name."""
    import argparse

    from nodekd_ray.cli import DATA_FIELDS, KD_FIELDS, STUDENT_NODE_FIELDS, TRAINING_FIELDS, build_parser
    from nodekd_ray.config_cli import add_dataclass_arguments, dataclass_values
    from nodekd_ray.models import NODEConfig
    from nodekd_ray.train import RecipeConfig, StudentConfig, TeacherConfig

    ap = build_parser()
    sub = ap._subparsers._group_actions[0].choices
    _generated(sub["train-student"], NODEConfig, STUDENT_NODE_FIELDS)
    _generated(sub["train-student"], StudentConfig, KD_FIELDS + DATA_FIELDS + TRAINING_FIELDS)
    _generated(sub["train-teacher"], TeacherConfig, ("model",) + DATA_FIELDS + TRAINING_FIELDS)
    base = ["train-student", "--out", "s.pt"]
    args = ap.parse_args(base)
    assert dataclass_values(args, STUDENT_NODE_FIELDS) == {f: getattr(NODEConfig(), f) for f in STUDENT_NODE_FIELDS}
    recipe = DATA_FIELDS + TRAINING_FIELDS
    assert dataclass_values(args, KD_FIELDS + recipe) == {f: getattr(StudentConfig(), f) for f in KD_FIELDS + recipe}
    args = ap.parse_args(base + [
        "--width", "8", "--t1", "2.5", "--adjoint", "--solver", "rk4", "--step-size", "0.25", "--max-num-steps", "50",
        "--time-input", "scaled", "--recompute", "--no-kd", "--T", "3", "--lam", "0.5", "--logits-mode", "views",
        "--dataset", "svhn", "--data-root", "/d", "--download", "--limit-test", "7", "--device", "cpu", "--seed", "4",
        "--limit-train", "9", "--epochs", "2", "--batch-size", "16", "--lr", "0.05", "--momentum", "0.8",
        "--weight-decay", "0.001", "--optimizer", "adam", "--crop-padding", "2", "--flip", "on",
        "--eval-batch-size", "50", "--log-dir", "/tb"])
    built = StudentConfig(node=NODEConfig(**dataclass_values(args, STUDENT_NODE_FIELDS)),
                          **dataclass_values(args, KD_FIELDS + recipe))
    assert built == StudentConfig(
        node=NODEConfig(width=8, t1=2.5, adjoint=True, solver="rk4", step_size=0.25, max_num_steps=50,
                        time_input="scaled", recompute=True),
        kd=False, T=3.0, lam=0.5, logits_mode="views", dataset="svhn", data_root="/d", download=True, limit_test=7,
        device="cpu", seed=4, limit_train=9, epochs=2, batch_size=16, lr=0.05, momentum=0.8, weight_decay=0.001,
        optimizer="adam", crop_padding=2, flip=True, eval_batch_size=50, log_dir="/tb")
    args = ap.parse_args(["train-teacher", "--out", "t.pt", "--model", "resnet56", "--flip", "off"])
    assert TeacherConfig(model=args.model, **dataclass_values(args, recipe)) == TeacherConfig(model="resnet56",
                                                                                               flip=False)

    @dataclasses.dataclass
    class NoHelp:
        x: int = 1

    with pytest.raises(TypeError, match="NoHelp.x has no metadata help"):
        add_dataclass_arguments(argparse.ArgumentParser(), NoHelp, ["x"])


def test_the_sweeps_options_are_generated_from_the_dataclasses_and_round_trip():
    """The sweep scripts' grid, attack, training and resource options come from SweepSpec, RecipeConfig, NODEConfig
    and Resources; flags give the spec, settings and resources they name; an option left out keeps the sweep's
    own value; older names parse to the same."""
    from nodekd_ray.models import NODEConfig
    from nodekd_ray.orchestration import Resources
    from nodekd_ray.orchestration.entry import (ATTACK_FIELDS, GRID_FIELDS, NODE_FIELDS, RESOURCE_FIELDS,
                                                TRAINING_FIELDS, apply_args, resources_from_args)
    from nodekd_ray.presets import SweepSpec
    from nodekd_ray.train import RecipeConfig

    ap = sweep_parser("t")
    _generated(ap, SweepSpec, GRID_FIELDS + ATTACK_FIELDS)
    _generated(ap, RecipeConfig, TRAINING_FIELDS)
    _generated(ap, NODEConfig, NODE_FIELDS)
    _generated(ap, Resources, RESOURCE_FIELDS)
    assert apply_args(PRESETS["figure1"], ap.parse_args([])) == PRESETS["figure1"]     # nothing given: the preset's
    args = ap.parse_args(["--dataset", "digits", "--teacher", "resnet20", "resnet32", "--T", "3", "20", "--t1", "1",
                          "--baseline-t1", "2", "--lam", "0.5", "0.9", "--logits-mode", "views", "--attack", "pgd",
                          "--eps", "0,4/255", "8/255", "--seeds", "2", "--epochs", "3", "--batch-size", "8", "--lr",
                          "0.01", "--momentum", "0.5", "--weight-decay", "0", "--optimizer", "sgd", "--limit-train",
                          "40", "--limit-test", "20", "--width", "16", "--cpus-per-trial", "2", "--gpus-per-trial",
                          "0.5", "--max-failures", "1", "--attack-retries", "0", "--max-concurrent", "3"])
    import dataclasses as dc

    assert apply_args(PRESETS["figure1"], args) == dc.replace(
        PRESETS["figure1"], datasets=("digits",), kd_teachers=("resnet20", "resnet32"), temperatures=(3.0, 20.0),
        kd_horizons=(1.0,), baseline_horizons=(2.0,), lam=(0.5, 0.9), logits_mode="views", attacks=("pgd",),
        eps_255=(0.0, 4.0, 8.0), seeds=(0, 1))
    settings = settings_from_args(args)
    recipe = dict(epochs=3, batch_size=8, lr=0.01, momentum=0.5, weight_decay=0.0, optimizer="sgd", limit_train=40,
                  limit_test=20)
    assert recipe.items() <= settings.teacher.items() and recipe.items() <= settings.student.items()
    assert settings.student["width"] == 16 and "width" not in settings.teacher
    assert resources_from_args(args) == Resources(cpus_per_trial=2.0, gpus_per_trial=0.5, max_failures=1,
                                                  attack_retries=0, max_concurrent=3)
    # the older names: the same parse, and not shown in --help
    old = ap.parse_args(["--temperatures", "3", "20", "--horizons", "1", "--teachers", "resnet20", "--attacks", "pgd",
                         "--baseline-horizons", "2"])
    new = ap.parse_args(["--T", "3", "20", "--t1", "1", "--teacher", "resnet20", "--attack", "pgd", "--baseline-t1",
                         "2"])
    assert vars(old) == vars(new)
    assert "--temperatures" not in ap.format_help() and "--T T [T ...]" in ap.format_help()


def test_one_name_for_one_thing_on_both_command_lines():
    """A concept both command lines offer has the same option name on both: nodekd's subcommands and the sweeps."""
    from nodekd_ray.cli import build_parser

    top = build_parser()
    sub = top._subparsers._group_actions[0].choices
    nodekd = {o for p in [top, *sub.values()] for a in p._actions for o in a.option_strings}
    sweeps = {o for a in sweep_parser("t")._actions if a.help != "==SUPPRESS==" for o in a.option_strings}
    shared = {"--dataset", "--teacher", "--T", "--t1", "--lam", "--logits-mode", "--attack", "--eps", "--epochs",
              "--batch-size", "--lr", "--momentum", "--weight-decay", "--optimizer", "--limit-train", "--limit-test",
              "--width", "--speed", "--node", "--eval-as-trained", "--data-root", "--download", "--version"}
    assert shared <= nodekd and shared <= sweeps, (shared - nodekd, shared - sweeps)
    search = sweep_parser("t", search=True)
    assert "--T" not in {o for a in search._actions for o in a.option_strings}    # the search draws T itself
