"""The Ray layer: the only part of nodekd_ray that imports Ray (inside functions, so importing
this package needs Ray installed but starts nothing).

  driver   connects to a cluster, schedules the stages (Tune grids, logits and attack tasks),
           places jobs on GPUs and collects failures
  search   the lambda / T search (Optuna TPE + ASHA over full-length schedules)
  entry    the sweep scripts' command line, --dry-run plans and the printed summary
"""
from .driver import Resources, SweepFailed, SweepInterrupted, connect, exit_now, run_sweep, running_cluster, stages
from .entry import apply_args, main, print_plan, print_summary, settings_from_args, sweep_parser
from .search import run_search

__all__ = ["Resources", "SweepFailed", "SweepInterrupted", "apply_args", "connect", "exit_now", "main", "print_plan",
           "print_summary", "run_search", "run_sweep", "running_cluster", "settings_from_args", "stages",
           "sweep_parser"]
