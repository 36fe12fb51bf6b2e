"""The Ray layer: the only part of nodekd_ray that imports Ray (inside functions, so importing
this package needs Ray installed but starts nothing).

  driver   runs a sweep: the stages (Tune grids, logits and attack tasks) in order, and their failures
  cluster  joins a cluster or starts a local instance; what each job asks for (Resources)
  tasks    what runs in the workers: the data in the object store, the trainable, the logits and attack tasks
  interrupt  Ctrl-C during a sweep
  progress one progress line per stage event instead of Tune's tables
  search   the lambda / T search (Optuna TPE + ASHA over full-length schedules)
  entry    the sweep scripts' command line, --dry-run plans and the printed summary
"""
from .cluster import Resources, connect, running_cluster
from .driver import SweepFailed, run_sweep, stages
from .interrupt import SweepInterrupted, exit_now
from .entry import apply_args, main, print_plan, print_summary, settings_from_args, sweep_parser
from .search import run_search

__all__ = ["Resources", "SweepFailed", "SweepInterrupted", "apply_args", "connect", "exit_now", "main", "print_plan",
           "print_summary", "run_search", "run_sweep", "running_cluster", "settings_from_args", "stages",
           "sweep_parser"]
