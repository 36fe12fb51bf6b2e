"""A sweep's parts under one name: the grid (presets.py), its jobs and settings (jobs.py), their expected cost and
order (schedule.py), and each job's work (work.py). Plain PyTorch and pyarrow; ``orchestration`` runs these jobs
as Ray Tune trials and Ray tasks, and ``report`` reads what they write. The storage layout: jobs.py.
"""
from __future__ import annotations

# One import for sweep scripts, the tests and Python users; each name is declared once, in the module named (the
# package's own modules import from those).
from .jobs import (AttackJob, Plan, Settings, StudentJob, TeacherJob, job_config, plan, student_config,
                   teacher_config, transfer_source)
from .models import ODESolveError
from .presets import DEMO, DIGITS, PRESETS, SCALES, SMOKE, SWEEP_ATTACKS, TEACHERS, SweepSpec
from .results import ATTACK_FILE_SCHEMA, ATTACK_SCHEMA
from .schedule import expected_cost, list_schedule, longest_first, node_nfe_guess
from .storage import Storage
from .work import (_attack_table_problem, attack_problem, load_model, logit_table, logits_problem,
                   parquet_bytes, read_attacks, record_arch, run_attack, run_training, save_model)

__all__ = ["ATTACK_FILE_SCHEMA", "ATTACK_SCHEMA", "DEMO", "DIGITS", "PRESETS", "SCALES", "SMOKE", "SWEEP_ATTACKS",
           "TEACHERS", "AttackJob", "ODESolveError", "Plan", "Settings", "Storage", "StudentJob", "SweepSpec",
           "TeacherJob", "_attack_table_problem", "attack_problem", "expected_cost", "job_config", "list_schedule",
           "load_model", "logit_table", "logits_problem", "longest_first", "node_nfe_guess", "parquet_bytes", "plan",
           "read_attacks", "record_arch", "run_attack", "run_training", "save_model", "student_config",
           "teacher_config", "transfer_source"]
