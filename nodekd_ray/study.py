"""The digits study: a small ResNet teacher, NODE students without and with KD (3 seeds each),
their clean accuracies and a short PGD curve, on one machine without Ray.

    .venv/bin/python -m nodekd_ray.study --dataset digits --out runs/digits-study

Study preset (not the paper's scale, which needs a GPU): ResNet20 teacher, NODE(1) students (no KD; KD under the paper's optimizer rule; KD with Adam) of
width 32 (stem 16) instead of 512, fewer epochs, batch 32 (digits is small); every other setting is the paper's recipe (SGD
lr 0.001 for the KD student at t1 = 1, Adam lr 0.001 without KD, lam 0.9, dopri5 at 1e-3).
Checkpoints are kept in --out; a rerun reuses every finished one.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from .attacks import attack_sweep, parse_eps
from .data import load_dataset
from .errors import ConfigError
from .checkpoints import load_checkpoint
from .models import NODEConfig
from .results import atomic_write_json, atomic_write_text
from .train import StudentConfig, TeacherConfig, save_trained, train_student, train_teacher


# kind -> optimizer: the paper's rule ("auto": Adam without KD, SGD with KD at t1 <= 1), and a KD
# student with Adam, which separates the effect of KD from the effect of the optimizer.
STUDENTS = {"node": "auto", "node-kd": "auto", "node-kd-adam": "adam"}


def _trained(path, make):
    """Loads the checkpoint at path, or trains with make() and saves it there first."""
    if not os.path.exists(path):
        model, _, ckpt = make()
        save_trained(path, model, ckpt)
    return load_checkpoint(path)


def run(args) -> dict:
    os.makedirs(args.out, exist_ok=True)
    data = load_dataset(args.dataset, root=args.data_root)
    data = (data[0].take(args.limit_train), data[1].take(args.limit_test))
    eps_list = parse_eps(args.eps)
    common = dict(dataset=args.dataset, device=args.device, batch_size=args.batch_size, limit_train=args.limit_train, limit_test=args.limit_test)
    quiet = dict(progress=True)
    t0 = time.perf_counter()
    teacher, tck = _trained(os.path.join(args.out, "teacher.pt"), lambda: train_teacher(
        TeacherConfig(model=args.teacher, epochs=args.teacher_epochs, **common), data=data, **quiet))
    node = NODEConfig(width=args.width, stem_channels=args.stem_channels, t1=args.t1)
    rows = {"teacher": [tck], **{k: [] for k in STUDENTS}}
    models = {"teacher": [teacher], **{k: [] for k in STUDENTS}}
    for seed in range(args.seeds):
        for kind, optimizer in STUDENTS.items():
            cfg = StudentConfig(node=node, kd=kind != "node", T=args.T, epochs=args.student_epochs, seed=seed,
                                optimizer=optimizer, **common)
            m, ck = _trained(os.path.join(args.out, f"{kind}-seed{seed}.pt"),
                             lambda: train_student(cfg, teacher=teacher, data=data, **quiet))
            rows[kind].append(ck)
            models[kind].append(m)
    test = data[1].take(args.attack_images)
    device = TeacherConfig(device=args.device).validate().torch_device()
    curves = {}
    for kind, ms in models.items():
        curves[kind] = []
        for m in ms:
            res = attack_sweep(m, test.images, test.labels, attack="pgd", eps_list=eps_list, batch_size=256,
                               seed=0, device=device)
            curves[kind].append(res.robust_accuracy())
    summary = {
        kind: {
            "clean": [ck["meta"]["test_accuracy"] for ck in rows[kind]],
            "pgd": {f"{e * 255:g}/255": [c[e] for c in curves[kind]] for e in eps_list},
        } for kind in rows
    }
    summary["settings"] = {k: v for k, v in vars(args).items()}
    summary["seconds"] = time.perf_counter() - t0
    atomic_write_json(summary, os.path.join(args.out, "study.json"))
    md = markdown(summary, eps_list, args)
    atomic_write_text(md, os.path.join(args.out, "study.md"))
    print(md)
    print(f"results: {os.path.join(args.out, 'study.md')} and study.json ({summary['seconds']:.0f}s)")
    return summary


def _ms(values) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def markdown(summary: dict, eps_list, args) -> str:
    names = {"teacher": f"{args.teacher} teacher (1 run)", "node": f"NODE({args.t1:g}) no KD",
             "node-kd": f"NODE({args.t1:g}) KD, T={args.T:g}, paper rule: SGD",
             "node-kd-adam": f"NODE({args.t1:g}) KD, T={args.T:g}, Adam"}
    keys = [f"{e * 255:g}/255" for e in eps_list]
    head = "| model | clean test acc. (%) | " + " | ".join(f"PGD ε={k}" for k in keys) + " |"
    lines = [f"Digits study: {args.seeds} seeds per student, mean ± std; PGD on {args.attack_images} test images.",
             "", head, "|" + " --- |" * (2 + len(keys))]
    for kind in ("teacher", *STUDENTS):
        s = summary[kind]
        lines.append(f"| {names[kind]} | {_ms(s['clean'])} | " + " | ".join(_ms(s["pgd"][k]) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="nodekd-study", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="digits", help="data set (default digits: offline)")
    ap.add_argument("--data-root", default="data", help="folder of cifar10/svhn files")
    ap.add_argument("--out", default="runs/digits-study", help="folder for checkpoints and results")
    ap.add_argument("--teacher", default="resnet20", help="teacher architecture")
    ap.add_argument("--teacher-epochs", type=int, default=15, help="teacher epochs")
    ap.add_argument("--student-epochs", type=int, default=10, help="student epochs")
    ap.add_argument("--batch-size", type=int, default=32,
                    help="batch size (paper: 128; digits' 1438 images would give only 12 steps an epoch)")
    ap.add_argument("--width", type=int, default=32, help="student ODE width (paper: 512)")
    ap.add_argument("--stem-channels", type=int, default=16, help="student stem channels")
    ap.add_argument("--t1", type=float, default=1.0, help="student horizon")
    ap.add_argument("--T", type=float, default=10.0, help="KD temperature")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per student")
    ap.add_argument("--eps", default="0,2/255,4/255,8/255", help="PGD eps list")
    ap.add_argument("--attack-images", type=int, default=200, help="test images attacked")
    ap.add_argument("--limit-train", type=int, help="first N training images")
    ap.add_argument("--limit-test", type=int, help="first N test images")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--smoke-test", action="store_true", help="tiny settings: seconds, for checking the plumbing")
    args = ap.parse_args(argv)
    if args.smoke_test:
        args.teacher_epochs, args.student_epochs, args.seeds = 1, 1, 1
        args.limit_train, args.limit_test, args.attack_images, args.width, args.stem_channels = 128, 64, 32, 16, 16
    try:
        run(args)
    except ConfigError as e:
        print(f"nodekd-study: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
