"""The sweep scripts' entry point: their command line, ``--dry-run`` plans, and the summary."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from ..computation import parse_node_overrides
from ..config_cli import OneLineParser as _Parser   # one-line errors naming the field
from ..errors import NO_SPACE, ConfigError, StorageFull, is_no_space
from ..jobs import Settings, job_config, plan
from ..presets import SCALES, SweepSpec
from ..schedule import expected_cost, list_schedule
from .cluster import Resources, gpu_node_cpus_per_gpu
from .driver import run_sweep, stages
from .interrupt import exit_now


# The sweep scripts' options generated from dataclass fields (config_cli.py), by group: the names, types, choices and
# help are the fields', and nodekd's options for the same fields have the same names (cli.py)
GRID_FIELDS = ("datasets", "teachers", "temperatures", "kd_horizons", "baseline_horizons", "lam", "logits_mode")
SEARCH_GRID_FIELDS = ("datasets", "logits_mode")           # the search draws lam and T; --teacher and --t1: its own
ATTACK_FIELDS = ("attacks", "eps_255")                      # presets.SweepSpec
TRAINING_FIELDS = ("epochs", "batch_size", "lr", "momentum", "weight_decay", "optimizer", "limit_train",
                   "limit_test")                            # train.RecipeConfig, for teachers and students
NODE_FIELDS = ("width",)                                    # models.NODEConfig, for the students
DATA_FIELDS = ("data_root", "download")                     # train.RecipeConfig
RESOURCE_FIELDS = ("cpus_per_trial", "gpus_per_trial", "max_failures", "attack_retries", "max_concurrent")
SEARCH_RESOURCE_FIELDS = tuple(f for f in RESOURCE_FIELDS if f != "attack_retries")


def sweep_parser(description: str, default_datasets=("cifar10", "svhn"), default_scale="paper", *,
                 search: bool = False) -> argparse.ArgumentParser:
    """Every sweep script's command line, in groups, generated from the fields of SweepSpec, RecipeConfig,
    NODEConfig and Resources. search: the λ/T search's, without the grid's and the attacks' flags (it searches λ
    and T, trains one seed, and attacks nothing): a flag it would not use is refused by argparse, not ignored."""
    from .._version import version_line
    from ..config_cli import add_dataclass_arguments
    from ..computation import SPEED_HELP, SPEEDS
    from ..models import NODEConfig
    from ..train import RecipeConfig

    ap = _Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=version_line())
    c = ap.add_argument_group("configuration file")
    c.add_argument("--config", metavar="FILE.yaml",
                   help="options from a YAML file (keys: these options' names, e.g. T: [3, 10]); flags given on the "
                        "command line override it. Examples: configs/")
    c.add_argument("--print-config", action="store_true",
                   help="print the options in effect (file, then flags) as YAML, a file --config reads back, with "
                        "the grid they make; start nothing")
    g = ap.add_argument_group(f"what to run (default: the sweep's own grid; its data sets: {' '.join(default_datasets)})")
    add_dataclass_arguments(g, SweepSpec, SEARCH_GRID_FIELDS if search else GRID_FIELDS, many=True,
                            unset="the sweep's own")
    g.add_argument("--scale", default=default_scale, choices=tuple(SCALES),
                   help=f"settings preset (default {default_scale}): paper (the paper's recipe), digits (students "
                        "that learn on digits on a CPU: width 32, Adam, reduced-strength audit attacks), demo (digits "
                        "cut to ~10 minutes), smoke (plumbing only); see nodekd_ray/presets.py")
    g.add_argument("--smoke-test", action="store_true", help="the same as --scale smoke: tiny models, seconds")
    if not search:
        g.add_argument("--seeds", type=int, default=None, metavar="N",
                       help="seeds 0..N-1 of every trial (default: the sweep's own: 1; the audit 3)")
    g.add_argument("--dry-run", action="store_true",
                   help="check the settings and the storage, print the plan, start nothing")

    t = ap.add_argument_group("training (teachers and students; default: the scale's, else the paper's recipe)")
    add_dataclass_arguments(t, RecipeConfig, TRAINING_FIELDS, unset="the scale's, else the paper's")
    add_dataclass_arguments(t, NODEConfig, NODE_FIELDS, unset="the scale's, else the paper's")
    t.add_argument("--speed", default=None, choices=SPEEDS, help=SPEED_HELP)
    t.add_argument("--node", action="append", default=None, metavar="FIELD=VALUE",
                   help="expert: set one NODEConfig field of every student on top of --speed (e.g. precision=bf16, "
                        "recompute=true); repeatable; see nodekd_ray/models.py, NODEConfig")

    if not search:
        a = ap.add_argument_group("attacks (default: the sweep's own; attacked images and strength: the scale's)")
        add_dataclass_arguments(a, SweepSpec, ATTACK_FIELDS, many=True, unset="the sweep's own")
        a.add_argument("--attack-images", type=int, default=None, metavar="N",
                       help="test images attacked (default: the scale's; paper: 1000)")
        a.add_argument("--eval-as-trained", action="store_true",
                       help="attacks and their clean pass compute with the students' training settings instead of "
                            "the reference computation (fp32 IEEE, torchdiffeq's dopri5, plain step control); rows "
                            "record which")

    d = ap.add_argument_group("data and results")
    d.add_argument("--storage", default=os.environ.get("NODEKD_STORAGE"),
                   help="experiment folder: a local path, a shared mount, or a URI (s3://bucket/prefix, gs://..., "
                        "file://...); default $NODEKD_STORAGE, else runs/nodekd (runs/nodekd-SCALE for other scales)")
    if not search:
        d.add_argument("--resume", action="store_true", help="continue an interrupted sweep in --storage")
    add_dataclass_arguments(d, RecipeConfig, DATA_FIELDS, unset="$NODEKD_DATA_ROOT, else data")

    r = ap.add_argument_group("cluster and resources")
    r.add_argument("--address", default=None,
                   help="Ray cluster address; 'local' starts a fresh local instance (default: join a running "
                        "cluster, else local)")
    r.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray instance")
    add_dataclass_arguments(r, Resources, SEARCH_RESOURCE_FIELDS if search else RESOURCE_FIELDS)
    if not search:
        r.add_argument("--plan-gpus", type=int, default=8, help="GPUs assumed by --dry-run's schedule estimate "
                                                                 "(default 8)")
        r.add_argument("--costs", nargs="+", default=None, metavar="FILE",
                       help="--dry-run: measured costs (benchmarks/bench_student.py --out, `nodekd costs`) that "
                            "turn the plan into GPU-hours and a makespan on --plan-gpus GPUs (nodekd_ray/costs.py)")
    return ap


def resources_from_args(args) -> Resources:
    from ..config_cli import given_values

    return Resources(**given_values(args, RESOURCE_FIELDS)).validate()


# Set by Ray's job supervisor in the environment of a job's entrypoint (`ray job submit`, a KubeRay RayJob).
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def check_job_storage(storage: str) -> None:
    """A job submitted through Ray's Jobs API runs in a temporary copy of its working directory, which
    Ray deletes: a relative storage folder there would lose the results. Refused in one line."""
    if os.environ.get(RAY_JOB_ENV) and "://" not in storage and not os.path.isabs(os.path.expanduser(storage)):
        raise ConfigError("storage", f"{storage!r} is relative, and this Ray job runs in a temporary copy of its "
                                     "working directory that Ray deletes: pass --storage an absolute path on a shared "
                                     "mount or a URI (s3://bucket/prefix), or set NODEKD_STORAGE on the cluster")


def check_storage(storage: str) -> None:
    """--dry-run's storage check: a malformed URI, an unreachable bucket or a folder that cannot be written is
    a one-line ConfigError before anything starts; nothing is left behind (storage.Storage.check_writable)."""
    from ..storage import Storage

    Storage(storage).check_writable()


def settings_from_args(args) -> Settings:
    from ..config_cli import given_values

    scale = SCALES[scale_of(args)]
    teacher, student = dict(scale.get("teacher", {})), dict(scale.get("student", {}))
    attack_images = scale.get("attack_images", 1000)
    recipe = given_values(args, TRAINING_FIELDS)
    for d in (teacher, student):
        d["data_root"] = getattr(args, "data_root", None) or os.environ.get("NODEKD_DATA_ROOT", "data")
        d["download"] = bool(getattr(args, "download", False))
        d.update(recipe)
    student.update(given_values(args, NODE_FIELDS))
    if getattr(args, "speed", None) not in (None, "default"):
        student["speed"] = args.speed             # resolved per device in sweep.student_config
    if getattr(args, "node", None):
        student.update(parse_node_overrides(args.node))
    if getattr(args, "attack_images", None) is not None:
        attack_images = args.attack_images
    return Settings(teacher=teacher, student=student, attack_images=attack_images, audit=dict(scale.get("audit", {})),
                    eval_computation="as-trained" if getattr(args, "eval_as_trained", False) else "reference")


def scale_of(args) -> str:
    """--smoke-test, else --scale (each sweep script has its own default: paper, or digits for the audit)."""
    if args.smoke_test:
        return "smoke"
    name = getattr(args, "scale", None) or "paper"
    if name not in SCALES:
        raise ConfigError("scale", f"must be one of {', '.join(SCALES)}, got {name!r}")
    return name


def apply_args(spec: SweepSpec, args) -> SweepSpec:
    """The sweep's spec with the scale's grid for this sweep (SCALES[...]["grid"][spec.name], e.g. the
    digits audit's T and horizons), then the command line's overrides, field by field."""
    from ..config_cli import given_values

    scale = SCALES[scale_of(args)]
    spec = dataclasses.replace(spec, **scale.get("grid", {}).get(spec.name, {}))
    if "eps_255" in scale:
        spec = dataclasses.replace(spec, eps_255=tuple(scale["eps_255"]))
    fields = {f.name: f for f in dataclasses.fields(SweepSpec)}
    kw = {}
    for name, value in given_values(args, GRID_FIELDS + ATTACK_FIELDS).items():
        convert = fields[name].metadata.get("convert", tuple)
        kw[name] = value if isinstance(value, str) else convert(value)
    teachers = kw.pop("teachers", None)
    if teachers is not None:     # --teacher: the sweep's teachers, and the ones it distills
        if spec.teachers:
            kw["teachers"] = teachers
        if spec.kd_teachers:
            kw["kd_teachers"] = teachers
    if "baseline_horizons" in kw and not spec.baseline_horizons:
        del kw["baseline_horizons"]          # a sweep without no-KD NODEs (Table 2) does not grow them
    if getattr(args, "seeds", None) is not None:
        kw["seeds"] = tuple(range(args.seeds))
    return dataclasses.replace(spec, **kw)


# options that are about this invocation, not about the sweep: never read from or printed into a config file
_NOT_CONFIG = ("help", "version", "config", "print_config", "dry_run")


def _key(option_string: str) -> str:
    return option_string.lstrip("-").replace("-", "_")


def _config_options(ap, *, shown: bool = False) -> dict:
    """Config-file key -> the option's action: every option's name in the config files' spelling (underscores),
    older names (aliases) included; shown: only the options --help shows, by their current names."""
    out = {}
    for a in ap._actions:
        if a.dest in _NOT_CONFIG or not a.option_strings:
            continue
        if shown and a.help == argparse.SUPPRESS:
            continue
        for o in a.option_strings:
            out.setdefault(_key(o), a)
    return out


def read_config(path: str, ap, sweep_names) -> dict:
    """A --config file's options, checked against the parser: unknown keys, wrong types and values outside an
    option's choices are one-line ConfigErrors naming the key. ``sweep``, when given, must name this script's
    sweep. Returns the options' values by their parser destinations (the dataclass fields)."""
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError("config", f"cannot read {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError("config", f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("config", f"{path} must be a mapping of option: value, got {type(data).__name__}")
    options = _config_options(ap)
    sweep = data.pop("sweep", None)
    if sweep is not None and sweep not in sweep_names:
        raise ConfigError("config", f"{path} is for the {sweep!r} sweep; this script runs {'+'.join(sweep_names)}")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in options:
            raise ConfigError(f"config.{key}", f"unknown option; allowed: "
                                               f"{', '.join(sorted(_config_options(ap, shown=True)))}")
        a = options[name]
        if value is None:           # null: the option's own default (what --print-config writes for it)
            out[a.dest] = a.default
            continue
        many = a.nargs in ("+", "*") or isinstance(a, argparse._AppendAction)
        values = value if isinstance(value, list) else [value]
        if not many and isinstance(value, list):
            raise ConfigError(f"config.{key}", f"takes one value, got a list: {value}")
        if isinstance(a, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if not isinstance(value, bool):
                raise ConfigError(f"config.{key}", f"must be true or false, got {value!r}")
            out[a.dest] = value
            continue
        try:
            conv = [a.type(v if a.type is not str else str(v)) if a.type is not None else str(v) for v in values]
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            raise ConfigError(f"config.{key}", f"must be {getattr(a.type, '__name__', 'a string')} values, got "
                                               f"{value!r}") from None
        for v in conv:
            if a.choices is not None and v not in a.choices:
                raise ConfigError(f"config.{key}", f"must be one of {', '.join(map(str, a.choices))}, got {v!r}")
        out[a.dest] = conv if many else conv[0]
    return out


def parse_sweep_args(ap, argv, sweep_names):
    """The command line over the --config file over the parser's defaults."""
    first, _ = ap.parse_known_args(argv)
    if first.config:
        ap.set_defaults(**read_config(first.config, ap, sweep_names))
    return ap.parse_args(argv)


def config_yaml(args, ap, sweep_names, specs=()) -> str:
    """--print-config: the options in effect as YAML that --config reads back, then the grid as comments."""
    import yaml

    options = {k: getattr(args, a.dest) for k, a in _config_options(ap, shown=True).items()
               if k == _key(a.option_strings[0])}
    options = {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}
    text = yaml.safe_dump({"sweep": "+".join(sweep_names), **options}, sort_keys=False, default_flow_style=None)
    for s in specs:
        grid = {k: v for k, v in dataclasses.asdict(s).items() if v not in ((), None)}
        text += f"# {s.name}'s grid from these options: " + yaml.safe_dump(grid, default_flow_style=True,
                                                                         width=10_000).strip() + "\n"
    return text


def main(specs, argv=None, *, description: str, default_datasets=("cifar10", "svhn"), default_scale="paper") -> int:
    """Entry point of every sweep script: parse, validate, run, print where the results are."""
    ap = sweep_parser(description, default_datasets, default_scale)
    prog = os.path.basename(sys.argv[0]) if argv is None else "sweep"
    names = [s.name for s in specs]
    try:
        args = parse_sweep_args(ap, argv, names)
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    try:
        if args.seeds is not None and args.seeds < 1:
            raise ConfigError("seeds", f"must be >= 1, got {args.seeds}")
        specs = [apply_args(s, args).validate() for s in specs]
        settings = settings_from_args(args).validate()
        if args.print_config:
            print(config_yaml(args, ap, names, specs), end="")
            return 0
        resources = resources_from_args(args)
        storage = args.storage or {"smoke": "runs/nodekd-smoke", "paper": "runs/nodekd"}.get(
            scale_of(args), f"runs/nodekd-{scale_of(args)}")
        check_job_storage(storage)
        if args.dry_run:
            check_storage(storage)
            costs = None
            if args.costs:
                from ..costs import load_costs
                costs = load_costs(args.costs)
            return print_plan(specs, settings, resources, storage, address=args.address, workers=args.plan_gpus,
                              costs=costs)
        summary = run_sweep(specs, settings, storage, resources=resources, resume=args.resume,
                            address=args.address, num_cpus=args.num_cpus)
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"{prog}: {str(e) or 'interrupted'}; finished trials and files are kept: rerun with --resume",
              file=sys.stderr)
        if argv is None:   # a sweep script, not a caller in this process
            exit_now(130)
        return 130
    except StorageFull as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        if not is_no_space(e):
            raise
        print(f"{prog}: storage: {NO_SPACE} ({e.filename or e}); free space, then rerun with --resume",
              file=sys.stderr)
        return 1
    return print_summary(summary)


def print_summary(summary: dict) -> int:
    secs = ", ".join(f"{k} {v:.0f}s" for k, v in summary["seconds"].items())
    print(f"\ntime: {secs}")
    att = summary["attacks"]
    print(f"attacks: {att['written']} written, {att['already']} already there, {len(att['failed'])} failed")
    for key, why in summary["failed"].items():
        print(f"FAILED trial {key}: {why}")
    for key, why in att["failed"].items():
        print(f"FAILED attack {key}: {why}")
    print(f"results: {summary['storage']}")
    for what, path in summary["report"].items():
        print(f"{what}: {path}")
    if summary.get("verdicts"):
        print("audit verdicts (details in audit.md):")
        for line in summary["verdicts"]:
            print(f"  {line}")
    print(f"TensorBoard: tensorboard --logdir {summary['tensorboard']}")
    return 1 if summary["failed"] or att["failed"] else 0




def print_plan(specs, settings: Settings, resources: Resources, storage: str, *, address=None, workers=8,
               out=None, costs: dict | None = None) -> int:
    """--dry-run: the jobs in the order each stage hands them to Ray, with epochs and resource
    requests, and a list-scheduling estimate of the stages on ``workers`` GPUs against the grid
    order with the no-KD NODEs behind the teachers. With ``costs`` (costs.load_costs): each job's
    GPU-hours, the total, and the makespan on ``workers`` GPUs. Starts nothing, writes nothing."""
    import torch

    from .cluster import running_cluster

    p = plan(specs, eps_per_task=settings.eps_per_task)
    staged = stages(p, settings)
    on_cluster = address != "local" and (address or running_cluster()) is not None
    here = [] if on_cluster else [{"CPU": os.cpu_count() or 1, "GPU": torch.cuda.device_count()}]
    res = resources.request(on_cluster, torch.cuda.device_count(), gpu_node_cpus_per_gpu(nodes=here))
    models = {j.key: j for j in p.jobs()}
    cost = {j.key: expected_cost(j, settings) for j in p.jobs()}
    attack_cost = [expected_cost(a, settings, models[a.model_key]) for a in p.attacks]
    total = sum(cost.values()) + sum(attack_cost)
    out = out if out is not None else sys.stdout    # looked up per call: a redirected stdout is honoured
    pr = lambda *a: print(*a, file=out)  # noqa: E731
    pr(f"plan for {'+'.join(s.name for s in specs)} into {storage} (--dry-run: nothing is started)")
    pr(f"each trial, logits and attack job asks for {res['cpu']:g} CPU and {res['gpu']:g} GPU"
       f" ({'a cluster' if on_cluster else 'a local Ray instance'})")
    for name, jobs in staged.items():
        pr(f"stage {name}: {len(jobs)} trials, longest expected first")
        for j in jobs:
            pr(f"  {j.key:<48} {job_config(j, settings).resolved_epochs():>4} epochs  {100 * cost[j.key] / total:5.1f}% of the compute")
    pr(f"attacks: {len(p.attacks)} tasks, longest expected first, {100 * sum(attack_cost) / total:.1f}% of the compute")
    new = list_schedule([[cost[j.key] for j in staged["teachers"]], [cost[j.key] for j in staged["students"]],
                         sorted(attack_cost, reverse=True)], workers)
    old = list_schedule([[cost[j.key] for j in p.teachers], [cost[j.key] for j in p.students], attack_cost], workers)
    pr(f"estimate on {workers} GPUs (expected cost, not a measurement): GPU time idle "
       f"{100 * new['idle_fraction']:.1f}% in this order, {100 * old['idle_fraction']:.1f}% in grid order; "
       f"makespan {new['makespan'] / old['makespan']:.2f}x of grid order's")
    if costs is not None:
        print_gpu_hours(p, staged, settings, costs, workers, pr)
    return 0


def print_gpu_hours(p, staged, settings, costs, workers, pr) -> None:
    from ..costs import job_seconds

    models = {j.key: j for j in p.jobs()}
    secs, how = {}, {"measured": 0, "rate": 0}
    for j in p.jobs():
        secs[j.key], h = job_seconds(j, settings, costs)
        how[h] += 1
    att = []
    for a in p.attacks:
        s, h = job_seconds(a, settings, costs, models[a.model_key])
        att.append(s)
    per_stage = {"teachers": sum(secs[j.key] for j in staged["teachers"]),
                 "students": sum(secs[j.key] for j in staged["students"]), "attacks": sum(att)}
    total = sum(per_stage.values())
    sched = list_schedule([[secs[j.key] for j in staged["teachers"]], [secs[j.key] for j in staged["students"]],
                           sorted(att, reverse=True)], workers)
    pr(f"cost on {costs.get('device') or 'the measured GPU'}: {total / 3600:.1f} GPU-hours "
       f"(teachers {per_stage['teachers'] / 3600:.1f}, students {per_stage['students'] / 3600:.1f}, "
       f"attacks {per_stage['attacks'] / 3600:.1f}); makespan on {workers} GPUs {sched['makespan'] / 3600:.1f} h")
    pr(f"  from {how['measured']} measured seconds per epoch and {how['rate']} jobs' FLOPs at the measured rates"
       f" (NFE: {'measured' if costs['nfe_forward'] else 'guessed'}; attacks at the rate of their model)")
