"""``nodekd``: train a teacher, train a student, attack a model.

Bad input prints one line ``nodekd: error: FIELD: what is allowed`` and exits 2, before anything
is written; outputs are written atomically at the end.
"""
from __future__ import annotations

import argparse
import os
import sys

from .config_cli import OneLineParser as _Parser   # one-line errors naming the field
from .errors import ConfigError, check_choice


# NODEConfig fields that `nodekd train-student` offers as options, generated from the dataclass (config_cli.py);
# the speed fields come through --speed and --node instead.
STUDENT_NODE_FIELDS = ("t1", "width", "layers", "stem_channels", "solver", "rtol", "atol", "max_num_steps",
                       "step_size", "adjoint", "time_input", "recompute")


# RecipeConfig fields that nodekd offers as options, generated from the dataclass (config_cli.py); the same fields
# are the sweeps' options of the same names (orchestration/entry.py)
DATA_FIELDS = ("dataset", "data_root", "download", "limit_test", "device", "seed")
TRAINING_FIELDS = ("limit_train", "epochs", "batch_size", "lr", "momentum", "weight_decay", "optimizer",
                   "crop_padding", "flip", "eval_batch_size", "log_dir")
KD_FIELDS = ("kd", "T", "lam", "logits_mode")


def _common(p: argparse.ArgumentParser, *, training: bool = True) -> None:
    from .config_cli import add_dataclass_arguments
    from .train import RecipeConfig

    g = p.add_argument_group("data")
    add_dataclass_arguments(g, RecipeConfig, DATA_FIELDS)
    g.add_argument("--out", required=True, help="output file (checkpoint .pt, or .parquet for attack)")
    g.add_argument("--force", action="store_true", help="replace --out if it exists")
    if not training:
        return
    t = p.add_argument_group("training (defaults: the paper's recipe for the data set)")
    add_dataclass_arguments(t, RecipeConfig, TRAINING_FIELDS)


def build_parser() -> argparse.ArgumentParser:
    from .attacks import ATTACKS
    from .config_cli import add_dataclass_arguments
    from .computation import SPEED_HELP, SPEEDS
    from .models import NODEConfig
    from .train import StudentConfig, TeacherConfig

    p = _Parser(prog="nodekd", description="Knowledge distillation from ResNets into Neural ODEs, and attacks on them.")
    from ._version import version_line

    p.add_argument("--version", action="version", version=version_line())
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train-teacher", help="train a CIFAR ResNet teacher", description="Train a CIFAR ResNet teacher.")
    add_dataclass_arguments(t, TeacherConfig, ("model",))
    _common(t)

    s = sub.add_parser("train-student", help="train a Neural ODE student, with or without KD",
                       description="Train a Neural ODE student (Algorithm 1 with --teacher, plain CE with --no-kd).")
    s.add_argument("--teacher", help="teacher checkpoint from train-teacher (needed unless --no-kd)")
    add_dataclass_arguments(s, StudentConfig, KD_FIELDS)
    n = s.add_argument_group("Neural ODE (from NODEConfig's fields)")
    add_dataclass_arguments(n, NODEConfig, STUDENT_NODE_FIELDS)
    sp = s.add_argument_group("speed (training only: evaluation runs on the reference computation)")
    sp.add_argument("--speed", default="default", choices=SPEEDS, help=SPEED_HELP)
    sp.add_argument("--node", action="append", default=[], metavar="FIELD=VALUE",
                    help="expert: set one NODEConfig field on top of --speed (e.g. precision=bf16, norm_impl=triton, "
                         "cuda_graphs=true); repeatable; see nodekd_ray/models.py, NODEConfig")
    _common(s)

    a = sub.add_parser("attack", help="attack one model on one data set over a list of eps",
                       description="White-box L-inf attack sweep; writes one Parquet row per (image, eps).")
    a.add_argument("--checkpoint", required=True, help="model checkpoint (teacher or student)")
    a.add_argument("--attack", default="pgd", help=f"one of {', '.join(ATTACKS)}")
    a.add_argument("--eps", nargs="+", default=["0,2/255,4/255,8/255,12/255,16/255,20/255"], metavar="EPS",
                   help="attack strengths: pixel units in [0, 1], fractions like 8/255, space- or comma-separated, "
                        "as the sweeps' --eps (default: 0,2/255,4/255,8/255,12/255,16/255,20/255)")
    a.add_argument("--steps", type=int, help="attack steps (default: floor(min(255 eps + 4, 1.25 * 255 eps)))")
    a.add_argument("--batch-size", type=int, default=256, help="fixed attack batch size")
    a.add_argument("--attack-misclassified", action="store_true",
                   help="also attack images the model gets wrong (default: they count as not robust)")
    a.add_argument("--eval-as-trained", action="store_true",
                   help="evaluate and attack with the model's training settings (precision, dopri5 implementation "
                        "and step control, norms, graphs); default: the reference computation (fp32 IEEE, "
                        "torchdiffeq's dopri5 with plain step control)")
    _common(a, training=False)

    r = sub.add_parser("report", help="write Tables 1-3 and Figure 1 from a sweep's results",
                       description="Tables 1-3 (Markdown, with the paper's numbers beside ours) and Figure 1 "
                                   "(PNG) from a sweep's trial records and Parquet files alone; written to "
                                   "RESULTS_DIR/report.")
    r.add_argument("results_dir", metavar="RESULTS_DIR", help="a sweep's --storage folder or URI")

    v = sub.add_parser("verify", help="check every result in a sweep's folder: complete, missing, damaged",
                       description="Checks every artifact of a sweep's --storage folder as the sweep reads it "
                                   "(records, models by size and SHA-256, logit tables, attack Parquet files) "
                                   "and what the sweeps that used it planned. Prints one line per damaged or "
                                   "missing item; exit 1 when something is damaged (`--resume` redoes it), "
                                   "else 0.")
    v.add_argument("results_dir", metavar="STORAGE", help="a sweep's --storage folder or URI")
    v.add_argument("-q", "--quiet", action="store_true", help="print the summary and the damaged items only")

    c = sub.add_parser("costs", help="measured seconds per epoch and NFE of a finished (pilot) sweep, for --dry-run --costs",
                       description="Reads a sweep folder's trial records and writes the median seconds per epoch of "
                                   "every finished job and the median forward NFE per horizon as a costs file "
                                   "(nodekd_ray/costs.py) that a sweep's --dry-run --costs turns into GPU-hours.")
    c.add_argument("results_dir", metavar="STORAGE", help="a sweep's --storage folder or URI")
    c.add_argument("--device", default=None, help="what the pilot ran on (recorded in the file)")
    c.add_argument("--out", default="-", help="costs file to write (default: standard output)")

    d = sub.add_parser("download", help="fetch cifar10/svhn into a data root once (file-locked)",
                       description="Download CIFAR10 and/or SVHN through torchvision into --data-root, once: "
                                   "a file lock makes concurrent calls (several nodes on shared storage) wait "
                                   "for the first; files already there are checked, not fetched again.")
    d.add_argument("datasets", nargs="+", metavar="NAME", help="cifar10 and/or svhn")
    d.add_argument("--data-root", default="data", help="folder for the torchvision files")
    return p


def _recipe_kwargs(args) -> dict:
    from .config_cli import dataclass_values

    return dataclass_values(args, DATA_FIELDS + TRAINING_FIELDS)


def _check_out(args) -> None:
    """Refuses an --out that exists (without --force), is a folder, or cannot be written (a
    read-only folder, a full disk): before the work, not after it. Leaves nothing behind."""
    import tempfile

    if os.path.exists(args.out) and not args.force:
        raise ConfigError("out", f"{args.out} exists; pass --force to replace it")
    if os.path.isdir(args.out):
        raise ConfigError("out", f"{args.out} is a folder; give a file name")
    folder = os.path.dirname(os.path.abspath(args.out))
    while not os.path.isdir(folder):
        if os.path.exists(folder):
            raise ConfigError("out", f"{folder} is a file, not a folder")
        folder = os.path.dirname(folder)
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".nodekd-write-probe.", suffix=".tmp") as f:
            f.write(b"x" * 65536)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise ConfigError("out", f"cannot write to {folder}: {e.strerror or e}") from None


def _check_dataset_match(ckpt: dict, dataset: str, what: str) -> None:
    trained_on = (ckpt.get("meta") or {}).get("config", {}).get("dataset")
    if trained_on is not None and trained_on != dataset:
        raise ConfigError(what, f"was trained on {trained_on!r}, not on --dataset {dataset!r}")


def cmd_train_teacher(args) -> None:
    from .train import TeacherConfig, save_trained, train_teacher

    cfg = TeacherConfig(model=args.model, **_recipe_kwargs(args)).validate()
    _check_out(args)
    model, history, ckpt = train_teacher(cfg)
    save_trained(args.out, model, ckpt)
    print(f"teacher {cfg.model} on {cfg.dataset}: test accuracy {history[-1]['test_accuracy']:.4f} -> {args.out}")


def cmd_train_student(args) -> None:
    from .checkpoints import load_checkpoint
    from .models import NODEConfig
    from .train import StudentConfig, save_trained, train_student

    from .config_cli import dataclass_values
    from .computation import parse_node_overrides, speed_settings
    from .train import RecipeConfig

    device_type = RecipeConfig(device=args.device).torch_device().type
    fields = dataclass_values(args, STUDENT_NODE_FIELDS)
    fields.update(speed_settings(args.speed, device_type))
    fields.update(parse_node_overrides(args.node))      # --node FIELD=VALUE, on top of everything
    node = NODEConfig(**fields)
    cfg = StudentConfig(node=node, **dataclass_values(args, KD_FIELDS), **_recipe_kwargs(args)).validate()
    _check_out(args)
    teacher = None
    if cfg.kd:
        if not args.teacher:
            raise ConfigError("teacher", "KD needs --teacher CHECKPOINT (or pass --no-kd)")
        from .models import RESNET_DEPTHS

        teacher, tck = load_checkpoint(args.teacher, expect_arch=tuple(RESNET_DEPTHS))
        _check_dataset_match(tck, cfg.dataset, "teacher")
    model, history, ckpt = train_student(cfg, teacher=teacher)
    save_trained(args.out, model, ckpt)
    kind = f"KD (T={cfg.T:g}, lam={cfg.lam:g}, {cfg.logits_mode} logits)" if cfg.kd else "no KD"
    print(f"NODE({cfg.node.t1:g}) {kind} on {cfg.dataset}: test accuracy {history[-1]['test_accuracy']:.4f} -> {args.out}")


def cmd_attack(args) -> None:
    import torch

    from .attacks import ATTACKS, attack_sweep, parse_eps, steps_for_eps, sweep_table
    from .data import load_dataset
    from .errors import check_choice
    from .checkpoints import load_checkpoint
    from .results import atomic_write_table
    from .train import RecipeConfig

    check_choice("attack", args.attack, ATTACKS)
    eps_list = parse_eps(",".join(args.eps))
    if args.steps is not None and args.steps < 0:
        raise ConfigError("steps", f"must be >= 0, got {args.steps}")
    if args.batch_size < 1:
        raise ConfigError("batch_size", f"must be >= 1, got {args.batch_size}")
    rc = RecipeConfig(dataset=args.dataset, device=args.device, limit_test=args.limit_test).validate()
    _check_out(args)
    model, ckpt = load_checkpoint(args.checkpoint)
    _check_dataset_match(ckpt, args.dataset, "checkpoint")
    _, test = load_dataset(args.dataset, root=args.data_root, download=args.download)
    test = test.take(args.limit_test)

    def progress(k, total, eps, acc):
        print(f"  eps {eps * 255:5.2f}/255  steps {args.steps if args.steps is not None else steps_for_eps(eps):3d}"
              f"  robust accuracy {acc:.4f}   [{k}/{total}]", file=sys.stderr, flush=True)

    torch.manual_seed(args.seed)
    res = attack_sweep(model, test.images, test.labels, attack=args.attack, eps_list=eps_list,
                       batch_size=args.batch_size, steps=args.steps, seed=args.seed, device=rc.torch_device(),
                       attack_misclassified=args.attack_misclassified, progress=progress,
                       computation="as-trained" if args.eval_as_trained else "reference")
    atomic_write_table(sweep_table(res, seed=args.seed), args.out)
    print(f"{args.attack} on {ckpt['arch']} ({len(test)} {args.dataset} test images) -> {args.out}")
    for eps, acc in res.robust_accuracy().items():
        print(f"  eps {eps * 255:5.2f}/255  accuracy {acc:.4f}")


def cmd_download(args) -> None:
    from .data import load_dataset

    for name in args.datasets:
        check_choice("dataset", name, ("cifar10", "svhn"))
    for name in args.datasets:
        train, test = load_dataset(name, root=args.data_root, download=True)
        print(f"{name}: {len(train)} training and {len(test)} test images in {args.data_root}")


def cmd_report(args) -> None:
    from .report import write_report

    verdicts = []
    for name, path in write_report(args.results_dir, verdicts=verdicts).items():
        print(f"{name}: {path}")
    for line in verdicts:
        print(f"  {line}")


def cmd_verify(args) -> int:
    from .verify import verify

    report = verify(args.results_dir)
    for line in report.lines(quiet=args.quiet):
        print(line)
    return 1 if report.damaged else 0


def cmd_costs(args) -> int:
    import json

    from .costs import costs_from_records
    from .results import atomic_write_text
    from .storage import Storage

    storage = Storage(args.results_dir)
    storage.check_reachable()
    if not storage.isdir(storage.base):
        raise ConfigError("results_dir", f"no such folder: {storage.name}")
    records = storage.records()
    data = costs_from_records(records)
    devices = {r.get("device") for r in records if r.get("status") == "done"} - {None}
    data = {"device": args.device or (", ".join(sorted(devices)) or None), **data}
    if not data["seconds_per_epoch"]:
        raise ConfigError("storage", f"{args.results_dir} holds no finished jobs with timed epochs")
    text = json.dumps(data, indent=1, sort_keys=True) + "\n"
    if args.out == "-":
        sys.stdout.write(text)
    else:
        atomic_write_text(text, args.out)
        print(f"{len(data['seconds_per_epoch'])} jobs' seconds per epoch -> {args.out}")
    return 0


COMMANDS = {"train-teacher": cmd_train_teacher, "train-student": cmd_train_student, "attack": cmd_attack,
            "report": cmd_report, "download": cmd_download, "verify": cmd_verify, "costs": cmd_costs}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc = COMMANDS[args.command](args)
    except ConfigError as e:
        print(f"nodekd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nodekd: interrupted; nothing was written", file=sys.stderr)
        return 130
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())
