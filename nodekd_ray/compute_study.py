"""The computation study: does a speed setting change the answer? On one machine, without Ray.

    python sweeps/compute.py --out runs/compute-study                  # CPU preset (digits, width 32)
    python sweeps/compute.py --preset gpu --out runs/compute-study-gpu # width 512 on a GPU

(a) Evaluation. The reference-trained students (``--seeds`` seeds, without and with KD) are evaluated
    clean (the whole test set) and attacked (PGD with the audit's step rule, "pgd-conv", and APGD-CE;
    ``--attack-images`` test images, eps 4/255 and 8/255) under each computation of EVAL_COMPUTATIONS.
    Each is compared with the same checkpoint on the reference computation.
(b) Training. Students are trained under each path of TRAINING_PATHS with the same seeds. They are
    evaluated and attacked on the reference computation, and compared with the reference-trained
    student of the same seed and group.

Robust accuracy at an eps is worst case over the two attacks, per image: an image counts as robust only
if neither attack fools the model. A verdict per computation (audit.computation_verdict) looks at the
95% t-interval of the seed-paired difference in clean and robust accuracy. "equivalent" means every
interval lies within +-2 points. "changes the answer" means one excludes 0. Anything else is
"inconclusive". It is given per group (no KD, KD) and overall. Overall, "equivalent" needs every group
to be equivalent, and "changes the answer" needs some group to change it.

Some computations are not distinct on a CPU. There, TF32 is IEEE fp32 ("tf32" equals "reference" and is
not run), and the Triton norms and CUDA graphs do not exist ("fastest" is bf16 with nodekd's dopri5 and
noise-aware control). Every row records what actually ran (computation.computation_info).

Everything lands in --out: checkpoints in students/, one JSON per evaluation in rows/, then rows.parquet
(per image), summary.json and audit.md. A rerun reuses every finished file.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass

from .errors import ConfigError
from .computation import SPEEDS, speed_settings

# Training paths: the --speed names, each resolved per device by computation.speed_settings (the one place).
TRAINING_PATHS = SPEEDS
_REF = speed_settings("reference")
# Evaluation computations (part a): NODEConfig fields; "reference" and "fastest" are the speeds of those names.
EVAL_COMPUTATIONS = {
    "reference": _REF,
    "tf32": dict(_REF, precision="tf32"),
    "bf16": dict(_REF, precision="bf16"),
    "noise-aware": dict(_REF, precision="tf32", solver_impl="nodekd", step_control="noise-aware"),
    "fastest": speed_settings("fastest"),
}
ATTACKS = ("pgd-conv", "apgd-ce")
EPS_255 = (4, 8)
GROUPS = {False: "no KD", True: "KD"}

# Presets. The CPU one is the digits study's student (width 32, stem 16, batch 32, Adam, lr kept to 3/4
# of the epochs, no crops; sweep.DIGITS) with 12 epochs instead of 20, so that 30 students (and 60 evaluations) fit in
# about an hour on 2 cores (63 min on 2026-12-05). T = 3 as in the digits audit grid. The GPU one is the paper's width.
PRESETS = {
    "cpu": dict(width=32, stem_channels=16, epochs=12, batch_size=32, teacher_epochs=15, attack_images=100,
                steps=20),
    "gpu": dict(width=512, stem_channels=64, epochs=20, batch_size=32, teacher_epochs=15, attack_images=200,
                steps=50),
    "smoke": dict(width=8, stem_channels=8, epochs=1, batch_size=32, teacher_epochs=1, attack_images=8, steps=2),
}


@dataclass(frozen=True)
class StudyArgs:
    out: str
    seeds: int
    width: int
    stem_channels: int
    epochs: int
    batch_size: int
    teacher_epochs: int
    attack_images: int
    steps: int
    T: float
    lam: float
    t1: float
    device: str
    limit_train: int | None = None
    limit_test: int | None = None


def fields_on(name: str, device_type: str) -> dict:
    """A training path's or an evaluation computation's NODEConfig fields as they run on a device of this type
    (the Triton norms and CUDA graphs only on CUDA)."""
    return speed_settings(name, device_type) if name in SPEEDS else dict(EVAL_COMPUTATIONS[name])


def distinct_computations(device_type: str) -> list[str]:
    """EVAL_COMPUTATIONS that differ from the reference on this device (TF32 is IEEE fp32 on a CPU)."""
    return [c for c in EVAL_COMPUTATIONS if not (device_type != "cuda" and c == "tf32")]


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", "cuda was asked for, but torch sees no GPU here")
    return torch.device(name)


def _data(a: StudyArgs):
    from .data import load_dataset

    train, test = load_dataset("digits")
    return train.take(a.limit_train), test.take(a.limit_test)


def _student_cfg(a: StudyArgs, path: str, kd: bool, seed: int, device):
    from .models import NODEConfig
    from .train import StudentConfig

    node = NODEConfig(width=a.width, stem_channels=a.stem_channels, t1=a.t1,
                      **fields_on(path, device.type))
    return StudentConfig(dataset="digits", node=node, kd=kd, T=a.T, lam=a.lam, epochs=a.epochs, seed=seed,
                         batch_size=a.batch_size, optimizer="adam", lr_milestones=(0.75, 0.9), crop_padding=0,
                         device=str(device), limit_train=a.limit_train, limit_test=a.limit_test).validate()


def student_path(a: StudyArgs, path: str, kd: bool, seed: int) -> str:
    return os.path.join(a.out, "students", f"{path}-{'kd' if kd else 'nokd'}-seed{seed}.pt")


def row_path(a: StudyArgs, phase: str, train: str, comp: str, kd: bool, seed: int) -> str:
    return os.path.join(a.out, "rows", f"{phase}-{train}-{comp}-{'kd' if kd else 'nokd'}-seed{seed}.json")


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def train_teacher_job(a: StudyArgs) -> str:
    from .train import TeacherConfig, save_trained, train_teacher

    path = os.path.join(a.out, "teacher.pt")
    if not os.path.exists(path):
        cfg = TeacherConfig(dataset="digits", model="resnet20", epochs=a.teacher_epochs, batch_size=32,
                            device=str(_device(a.device)), limit_train=a.limit_train, limit_test=a.limit_test)
        model, _, ckpt = train_teacher(cfg, data=_data(a), progress=False, log=lambda m: None)
        save_trained(path, model, ckpt)
    return path


def train_job(a: StudyArgs, path: str, kd: bool, seed: int) -> dict:
    """Trains one student (or finds it trained). Returns its seconds and final record fields."""
    from .checkpoints import load_checkpoint
    from .train import save_trained, train_student

    out = student_path(a, path, kd, seed)
    if os.path.exists(out):
        return {"reused": True}
    device = _device(a.device)
    teacher = load_checkpoint(os.path.join(a.out, "teacher.pt"), map_location=device)[0] if kd else None
    t0 = time.perf_counter()
    model, hist, ckpt = train_student(_student_cfg(a, path, kd, seed, device), teacher=teacher, data=_data(a),
                                      progress=False, log=lambda m: None)
    ckpt["meta"]["seconds"] = time.perf_counter() - t0
    os.makedirs(os.path.dirname(out), exist_ok=True)
    save_trained(out, model, ckpt)
    return {"reused": False, "seconds": ckpt["meta"]["seconds"]}


def eval_job(a: StudyArgs, phase: str, train: str, comp: str, kd: bool, seed: int) -> dict:
    """Clean accuracy on the whole test set and both attacks at each eps, one student under one computation."""
    import numpy as np

    from .attacks import AuditConfig, attack_sweep
    from .checkpoints import load_checkpoint
    from .computation import computation_info, with_computation
    from .results import atomic_write_json
    from .train import evaluate

    out = row_path(a, phase, train, comp, kd, seed)
    if os.path.exists(out):
        with open(out) as f:
            return json.load(f)
    device = _device(a.device)
    model = load_checkpoint(student_path(a, train, kd, seed), map_location=device)[0]
    _, test = _data(a)
    ref = comp == "reference"
    m = model if ref else with_computation(model, **fields_on(comp, device.type))
    how = "reference" if ref else "as-trained"      # attack_sweep: the reference, or m as it is built
    t0 = time.perf_counter()
    clean = evaluate(m, test, device=device, computation=how)
    attacked = test.take(a.attack_images)
    audit = AuditConfig(steps=a.steps, apgd_steps=a.steps)
    per_attack, computation = {}, None
    for attack in ATTACKS:
        res = attack_sweep(m, attacked.images, attacked.labels, attack=attack, eps_list=[e / 255 for e in EPS_255],
                           batch_size=a.attack_images, seed=seed, device=device, audit=audit, computation=how)
        computation = res.computation
        per_attack[attack] = {str(e): res.adv_correct[np.isclose(res.eps, e / 255)].tolist() for e in EPS_255}
        per_attack[attack]["clean_correct"] = res.clean_correct[np.isclose(res.eps, EPS_255[0] / 255)].tolist()
        per_attack[attack]["nfe"] = res.nfe.tolist()
    robust = {str(e): float(np.mean(np.logical_and.reduce([per_attack[k][str(e)] for k in ATTACKS]))) for e in EPS_255}
    row = {"phase": phase, "train": train, "eval": comp, "kd": kd, "seed": seed, "clean": clean["accuracy"],
           "clean_images": len(test), "nfe_clean": clean["nfe_per_image"], "robust": robust,
           "attack_images": a.attack_images, "per_attack": per_attack, "computation": computation,
           "device": str(device), "trained_with": computation_info(model, device),
           "seconds": time.perf_counter() - t0}
    atomic_write_json(row, out)
    return row


# ----------------------------------------------------------------------------- verdicts


def _differences(rows: list[dict], phase: str, key: str, kd: bool) -> dict:
    """{metric: [seed-paired difference in points, per seed]} of ``key`` (an eval computation in phase a, a
    training path in phase b) against the reference, in group kd."""
    field = "eval" if phase == "a" else "train"
    other = {r["seed"]: r for r in rows if r["phase"] == phase and r[field] == key and r["kd"] == kd}
    base_phase = "b"   # the reference-trained students on the reference computation, shared by both phases
    base = {r["seed"]: r for r in rows if r["phase"] == base_phase and r["train"] == "reference"
            and r["eval"] == "reference" and r["kd"] == kd}
    seeds = sorted(set(other) & set(base))
    out = {"clean": [100 * (other[s]["clean"] - base[s]["clean"]) for s in seeds]}
    for e in EPS_255:
        out[f"robust@{e}/255"] = [100 * (other[s]["robust"][str(e)] - base[s]["robust"][str(e)]) for s in seeds]
    return out


def verdict_table(rows: list[dict], device_type: str) -> list[dict]:
    from .audit import computation_verdict

    out = []
    for phase, keys in (("a", [c for c in distinct_computations(device_type) if c != "reference"]),
                        ("b", [p for p in TRAINING_PATHS if p != "reference"])):
        for key in keys:
            groups = {}
            for kd in (False, True):
                groups[GROUPS[kd]] = computation_verdict(_differences(rows, phase, key, kd))
            verdicts = [g["verdict"] for g in groups.values()]
            overall = ("equivalent" if all(v == "equivalent" for v in verdicts) else
                       "changes the answer" if "changes the answer" in verdicts else "inconclusive")
            out.append({"phase": phase, "computation": key, "verdict": overall, "groups": groups})
    return out


def _ms(values) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def audit_markdown(rows: list[dict], verdicts: list[dict], a: StudyArgs, device_desc: str, device_type: str) -> str:
    from .audit import EQUIVALENCE_MARGIN

    lines = ["# Computation study", "",
             f"Device: {device_desc}. Students: digits, width {a.width} (stem {a.stem_channels}), NODE({a.t1:g}), "
             f"{a.epochs} epochs, batch {a.batch_size}, Adam; KD from a ResNet20 teacher at T = {a.T:g}, "
             f"λ = {a.lam:g}. {a.seeds} seeds per group.",
             f"Clean accuracy on the whole test set; robust accuracy on the first {a.attack_images} test images, "
             f"worst case per image over {' and '.join(ATTACKS)} ({a.steps} steps each).",
             f"Verdict rule: *equivalent* when the 95% t-interval of the seed-paired difference in clean and in "
             f"robust accuracy lies within ±{EQUIVALENCE_MARGIN:g} points; otherwise *changes the answer* when "
             "an interval excludes 0, else *inconclusive*. Overall: equivalent only if equivalent in both groups.",
             ""]
    if device_type != "cuda":
        lines += ["On this CPU, TF32 is IEEE fp32 (`tf32` equals `reference`, not run), and the Triton norms and "
                  "CUDA graphs do not run (`fastest` is bf16 autocast, nodekd's dopri5, noise-aware control).", ""]
    lines += ["## Mean accuracy (%) per computation, mean ± std over seeds", "",
              "| phase | trained | evaluated | group | clean | " + " | ".join(f"robust {e}/255" for e in EPS_255) +
              " | NFE (clean) |", "|" + " --- |" * (6 + len(EPS_255))]
    keys = sorted({(r["phase"], r["train"], r["eval"], r["kd"]) for r in rows})
    for ph, tr, ev, kd in keys:
        rs = [r for r in rows if (r["phase"], r["train"], r["eval"], r["kd"]) == (ph, tr, ev, kd)]
        nfe = statistics.mean(r["nfe_clean"] for r in rs)
        lines.append(f"| {ph} | {tr} | {ev} | {GROUPS[kd]} | {_ms([r['clean'] for r in rs])} | " +
                     " | ".join(_ms([r["robust"][str(e)] for r in rs]) for e in EPS_255) + f" | {nfe:.1f} |")
    lines += ["", "## Verdicts (differences against the reference, points, 95% t-interval)", "",
              "| phase | computation | group | clean | " + " | ".join(f"robust {e}/255" for e in EPS_255) +
              " | verdict |", "|" + " --- |" * (5 + len(EPS_255))]
    for v in verdicts:
        for g, gv in v["groups"].items():
            cells = []
            for metric in ["clean"] + [f"robust@{e}/255" for e in EPS_255]:
                p = gv["metrics"].get(metric, {})
                cells.append(f"{p['mean']:+.1f} ± {p['half']:.1f}" if "mean" in p else f"n = {p.get('n', 0)}")
            lines.append(f"| {v['phase']} | {v['computation']} | {g} | " + " | ".join(cells) + f" | {gv['verdict']} |")
        lines.append(f"| {v['phase']} | {v['computation']} | **overall** | | " + " | " * (len(EPS_255) - 1) +
                     f" | **{v['verdict']}** |")
    lines += ["", "Phase a: the same reference-trained checkpoints evaluated and attacked under each computation. "
              "Phase b: students trained under each path, evaluated and attacked on the reference computation.", ""]
    return "\n".join(lines) + "\n"


def write_parquet(rows: list[dict], path: str) -> None:
    import pyarrow as pa

    from .results import atomic_write_table

    cols = {k: [] for k in ("phase", "train", "eval", "kd", "seed", "attack", "eps_255", "index", "clean_correct",
                            "adv_correct", "nfe", "precision", "step_control", "solver_impl", "norm_impl",
                            "cuda_graphs", "torch_version", "device")}
    for r in rows:
        c = r["computation"]
        for attack, res in r["per_attack"].items():
            n = len(res["clean_correct"])
            for k, e in enumerate(EPS_255):
                for i in range(n):
                    for name, v in (("phase", r["phase"]), ("train", r["train"]), ("eval", r["eval"]),
                                    ("kd", r["kd"]), ("seed", r["seed"]), ("attack", attack), ("eps_255", float(e)),
                                    ("index", i), ("clean_correct", res["clean_correct"][i]),
                                    ("adv_correct", res[str(e)][i]), ("nfe", res["nfe"][k * n + i]),
                                    ("precision", c["precision"]), ("step_control", c["step_control"]),
                                    ("solver_impl", c["solver_impl"]), ("norm_impl", c["norm_impl"]),
                                    ("cuda_graphs", c["cuda_graphs"]), ("torch_version", c["torch_version"]),
                                    ("device", r["device"])):
                        cols[name].append(v)
    atomic_write_table(pa.table(cols), path)


# ----------------------------------------------------------------------------- running it


def _run_pool(fn, jobs: list[tuple], workers: int, threads: int, what: str) -> list:
    """Runs fn(*job) for every job, ``workers`` processes at a time; a line per finished job with an ETA."""
    results, t0 = [], time.perf_counter()
    if not jobs:
        return results
    pool = ProcessPoolExecutor(max_workers=workers, initializer=_init_worker, initargs=(threads,),
                               mp_context=__import__("multiprocessing").get_context("spawn"))
    with pool:
        futures = {pool.submit(fn, *job): job for job in jobs}
        for k, fut in enumerate(as_completed(futures), 1):
            results.append(fut.result())      # a failure stops the study; finished files stay for the rerun
            el = time.perf_counter() - t0
            eta = el / k * (len(jobs) - k)
            print(f"{what}: {k}/{len(jobs)} done ({futures[fut][1:]}), {el:.0f} s so far, about {eta:.0f} s left",
                  flush=True)
    return results


def run(a: StudyArgs, workers: int) -> dict:
    import torch

    from .devices import describe_device

    device = _device(a.device)
    os.makedirs(os.path.join(a.out, "rows"), exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // workers) if device.type == "cpu" else 1
    if device.type == "cuda":
        workers = 1            # one GPU: one process, the whole device each
    t0 = time.perf_counter()
    print(f"computation study: {a.seeds} seeds x {len(TRAINING_PATHS)} training paths x 2 groups on "
          f"{describe_device(device)}, {workers} worker(s); files in {a.out}", flush=True)
    train_teacher_job(a)
    seeds = range(a.seeds)
    jobs = [(a, p, kd, s) for s in seeds for kd in (False, True) for p in TRAINING_PATHS]
    _run_pool(train_job, jobs, workers, threads, "students")
    evals = [(a, "b", p, "reference", kd, s) for s in seeds for kd in (False, True) for p in TRAINING_PATHS]
    evals += [(a, "a", "reference", c, kd, s) for s in seeds for kd in (False, True)
              for c in distinct_computations(device.type) if c != "reference"]
    rows = _run_pool(eval_job, evals, workers, threads, "evaluations")
    verdicts = verdict_table(rows, device.type)
    md = audit_markdown(rows, verdicts, a, describe_device(device), device.type)
    from .results import atomic_write_json, atomic_write_text

    write_parquet(rows, os.path.join(a.out, "rows.parquet"))
    summary = {"settings": asdict(a), "workers": workers, "device": describe_device(device),
               "torch_version": torch.__version__, "verdicts": verdicts,
               "student_seconds": {os.path.basename(student_path(a, p, kd, s)): _seconds(a, p, kd, s)
                                   for (_, p, kd, s) in jobs},
               "seconds": time.perf_counter() - t0}
    atomic_write_json(summary, os.path.join(a.out, "summary.json"))
    atomic_write_text(md, os.path.join(a.out, "audit.md"))
    print(md)
    print(f"results: {os.path.join(a.out, 'audit.md')}, rows.parquet (per image) and summary.json "
          f"({summary['seconds']:.0f} s)")
    return summary


def _seconds(a, p, kd, s):
    import torch

    meta = torch.load(student_path(a, p, kd, s), map_location="cpu", weights_only=True)["meta"]
    return meta.get("seconds")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sweeps/compute.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:3]))
    ap.add_argument("--preset", default="cpu", choices=tuple(PRESETS),
                    help="sizes: cpu (width 32, 12 epochs, 100 attacked images, 20 attack steps; about an hour on "
                         "2 cores), gpu (width 512, 20 epochs, 200 images, 50 steps) or smoke (seconds)")
    ap.add_argument("--out", default="runs/compute-study", help="output folder (a rerun reuses finished files)")
    ap.add_argument("--seeds", type=int, default=5, help="seeds per training path and group (at least 2; default 5)")
    ap.add_argument("--T", type=float, default=3.0, help="KD temperature (default 3, the digits audit's)")
    ap.add_argument("--lam", type=float, default=0.9, help="KD weight (paper: 0.9)")
    ap.add_argument("--t1", type=float, default=1.0, help="students' horizon (default 1)")
    ap.add_argument("--workers", type=int, default=2, help="processes on a CPU (default 2; one on a GPU)")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    for name in ("width", "stem-channels", "epochs", "batch-size", "teacher-epochs", "attack-images", "steps",
                 "limit-train", "limit-test"):
        ap.add_argument(f"--{name}", type=int, default=None, help=f"override the preset's {name}")
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    p = dict(PRESETS[args.preset])
    for k in ("width", "stem_channels", "epochs", "batch_size", "teacher_epochs", "attack_images", "steps"):
        if getattr(args, k) is not None:
            p[k] = getattr(args, k)
    try:
        if args.seeds < 2:
            raise ConfigError("seeds", f"must be >= 2 (a t-interval needs two seeds), got {args.seeds}")
        if args.workers < 1:
            raise ConfigError("workers", f"must be >= 1, got {args.workers}")
        for k, v in p.items():
            if v < 1:
                raise ConfigError(k, f"must be >= 1, got {v}")
        a = StudyArgs(out=args.out, seeds=args.seeds, T=args.T, lam=args.lam, t1=args.t1, device=args.device,
                      limit_train=args.limit_train, limit_test=args.limit_test, **p)
        _device(a.device)
        run(a, args.workers)
    except ConfigError as e:
        print(f"compute.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
