"""Search lambda and T for one teacher / data set / horizon: Optuna's TPE through Ray Tune's
OptunaSearch, ASHA early stopping, and a persistent Optuna study (STORAGE/optuna.journal) that a
rerun continues. Prints the best (lambda, T) and its test accuracy.

    python sweeps/search_lambda_T.py --dataset cifar10 --teacher resnet44 --num-samples 40
    python sweeps/search_lambda_T.py --dataset digits --smoke-test --num-samples 6
    python sweeps/search_lambda_T.py --dataset digits --scale digits --dry-run     # the plan; starts nothing
"""
import sys

try:  # Ctrl-C while torch and Ray load: one line, exit 130
    from nodekd_ray.errors import ConfigError
    from nodekd_ray.orchestration import SweepFailed, exit_now, run_search, settings_from_args, sweep_parser
    from nodekd_ray.orchestration.entry import check_job_storage, config_yaml, parse_sweep_args, resources_from_args
except KeyboardInterrupt:
    sys.exit(print(f"{sys.argv[0]}: interrupted while starting; nothing was written", file=sys.stderr) or 130)

if __name__ == "__main__":
    ap = sweep_parser(__doc__, default_datasets=("cifar10",), search=True)   # grid and attack flags: refused
    ap.add_argument("--teacher", default="resnet44", help="the teacher ResNet")
    ap.add_argument("--t1", type=float, default=1.0, help="the student's horizon")
    ap.add_argument("--num-samples", type=int, default=40, help="(lam, T) trials in the study, earlier runs included")
    ap.add_argument("--lam-range", nargs=2, type=float, default=(0.0, 1.0), metavar=("LOW", "HIGH"),
                    help="lambda is drawn from [LOW, HIGH] (default 0 1)")
    ap.add_argument("--T-range", nargs=2, type=float, default=(1.0, 30.0), metavar=("LOW", "HIGH"),
                    help="T is drawn from [LOW, HIGH] (default 1 30)")
    ap.add_argument("--grace-fraction", type=float, default=0.25,
                    help="ASHA grace period as a fraction of the students' epochs (max_t is all of them)")
    try:
        args = parse_sweep_args(ap, None, ["search"])
        if args.print_config:
            sys.exit(print(config_yaml(args, ap, ["search"]), end="") or 0)
        datasets = args.datasets or ["cifar10"]
        if len(datasets) != 1:
            raise ConfigError("dataset", "the search takes one data set")
        storage = args.storage or ("runs/nodekd-smoke" if args.smoke_test else "runs/nodekd")
        check_job_storage(storage)
        best = run_search(dataset=datasets[0], teacher=args.teacher, t1=args.t1,
                          logits_mode=args.logits_mode or "paper",      # not given: the paper's
                          num_samples=args.num_samples, settings=settings_from_args(args).validate(),
                          storage_root=storage,
                          resources=resources_from_args(args),
                          lam_range=tuple(args.lam_range), T_range=tuple(args.T_range),
                          grace_fraction=args.grace_fraction,
                          address=args.address, num_cpus=args.num_cpus, dry_run=args.dry_run)
    except ConfigError as e:
        print(f"search_lambda_T.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except SweepFailed as e:
        print(f"search_lambda_T.py: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("search_lambda_T.py: interrupted; finished trials and the study are kept: rerun to continue",
              file=sys.stderr)
        exit_now(130)
    if best.get("dry_run"):
        sys.exit(0)
    print(f"best: lam = {best['best_lam']:.3f}, T = {best['best_T']:.2f}, test accuracy "
          f"{100 * best['best_test_accuracy']:.2f}% over {best['trials']} full-length trials of {best['epochs']} "
          f"epochs ({best['pruned']} stopped early by ASHA)")
    print(f"results: {best['storage']}\n  best (lam, T): {best['result']}\n  Optuna study: {best['journal']} "
          f"(optuna-dashboard {best['journal']})\nTensorBoard: tensorboard --logdir {best['tensorboard']}")
