"""The attack audit: is the students' robustness real, or an artefact of weak attacks and of the
adaptive solver (gradient masking)? Trains the ResNet20 teacher and NODE(1), NODE(100) with and
without KD (T = 10) for 3 seeds, attacks them with the paper's PGD and MI-FGSM and with every audit
attack (PGD to convergence and with restarts, APGD-CE/DLR, Square, transfer from the teacher and
from the no-KD NODE, gradients through rk4, test-time tolerances), and writes report/audit.md with
one verdict per claim. Digits at --scale digits by default (minutes per model on a CPU).

    python sweeps/audit.py                                   # digits, 3 seeds
    python sweeps/audit.py --scale demo --seeds 1 --horizons 1 --baseline-horizons 1 --temperatures 3 \
        --attacks pgd mifgsm pgd-conv apgd-ce square transfer-teacher tol-1e-1   # make demo
    python sweeps/audit.py --dataset cifar10 --scale paper   # the paper's scale (GPU cluster)
    python sweeps/audit.py --smoke-test                      # plumbing only (tests)
"""
import sys

try:  # Ctrl-C while torch and Ray load: one line, exit 130
    from nodekd_ray.orchestration import main
    from nodekd_ray.sweep import PRESETS
except KeyboardInterrupt:
    sys.exit(print(f"{sys.argv[0]}: interrupted while starting; nothing was written", file=sys.stderr) or 130)

if __name__ == "__main__":
    sys.exit(main([PRESETS["audit"]], description=__doc__, default_datasets=("digits",), default_scale="digits"))
