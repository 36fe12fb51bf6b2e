"""Configuration files for sweeps: --config FILE.yaml under command-line flags, --print-config that --config reads
back, one-line errors for unknown keys and bad values, and every example in configs/ runs (--dry-run)."""
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
    first = _printed(capsys, ["--temperatures", "3", "10", "--speed", "fastest", "--node", "recompute=true"])
    cfg = yaml.safe_load(first)
    assert cfg["sweep"] == "table2" and cfg["temperatures"] == [3.0, 10.0] and cfg["speed"] == "fastest"
    assert cfg["node"] == ["recompute=true"]
    assert "# table2's grid from these options:" in first and "temperatures: [3.0, 10.0]" in first.splitlines()[-1]
    path = tmp_path / "c.yaml"
    path.write_text(first)
    assert _printed(capsys, ["--config", str(path)]) == first                      # read back: the same options
    over = yaml.safe_load(_printed(capsys, ["--config", str(path), "--temperatures", "20", "--lam", "0.5"]))
    assert over["temperatures"] == [20.0] and over["lam"] == 0.5 and over["speed"] == "fastest"   # flags on top
    # and what the sweep is built from: the file's options reach the settings
    ap = sweep_parser("t")
    args = parse_sweep_args(ap, ["--config", str(path)], ["table2"])
    assert settings_from_args(args).student["speed"] == "fastest"


@pytest.mark.parametrize("text, message", [
    ("temperatres: [3]\n", "config.temperatres: unknown option; allowed: "),
    ("speed: fast\n", "config.speed: must be one of reference, default, fastest, got 'fast'"),
    ("temperatures: [a]\n", "config.temperatures: must be float values, got ['a']"),
    ("lam: [0.1, 0.2]\n", "config.lam: takes one value, got a list"),
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


def test_the_students_options_are_generated_from_nodeconfig_and_round_trip():
    """nodekd train-student's Neural ODE options come from NODEConfig's fields: each default is the dataclass's
    (they cannot drift apart), each help is the field's, and parsed flags give the NODEConfig they name."""
    import argparse
    import dataclasses

    from nodekd_ray.cli import STUDENT_NODE_FIELDS, build_parser
    from nodekd_ray.config_cli import add_dataclass_arguments, dataclass_values
    from nodekd_ray.models import NODEConfig

    ap = build_parser()
    base = ["train-student", "--no-kd", "--out", "s.pt"]
    defaults = dataclass_values(ap.parse_args(base), STUDENT_NODE_FIELDS)
    assert defaults == {f: getattr(NODEConfig(), f) for f in STUDENT_NODE_FIELDS}
    args = ap.parse_args(base + ["--width", "8", "--t1", "2.5", "--adjoint", "--solver", "rk4", "--step-size", "0.25",
                                 "--max-num-steps", "50", "--time-input", "scaled", "--recompute"])
    assert NODEConfig(**dataclass_values(args, STUDENT_NODE_FIELDS)) == NODEConfig(
        width=8, t1=2.5, adjoint=True, solver="rk4", step_size=0.25, max_num_steps=50, time_input="scaled",
        recompute=True)
    helps = {a.dest: a.help for a in ap._subparsers._group_actions[0].choices["train-student"]._actions}
    fields = {f.name: f for f in dataclasses.fields(NODEConfig)}
    assert all(helps[f].startswith(fields[f].metadata["help"]) for f in STUDENT_NODE_FIELDS)

    @dataclasses.dataclass
    class NoHelp:
        x: int = 1

    with pytest.raises(TypeError, match="NoHelp.x has no metadata help"):
        add_dataclass_arguments(argparse.ArgumentParser(), NoHelp, ["x"])
