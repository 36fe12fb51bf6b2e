"""The attack audit: is the students' robustness real, or an artefact of weak attacks and of the
adaptive solver (gradient masking)? Trains a ResNet20 teacher and NODE students with and without KD
for 3 seeds, attacks them with the paper's PGD and MI-FGSM and with every audit attack (PGD to
convergence and with restarts, APGD-CE/DLR, Square, transfer from the teacher and from the no-KD
NODE, gradients through rk4, test-time tolerances), and writes report/audit.md with one verdict per
claim. Digits at --scale digits by default: T = 3, horizons 1 and 10, about 55 min on 2 CPU cores
(the paper's T = 10 and horizons 1 and 100 at --scale paper; see nodekd_ray/sweep.py, DIGITS).

    python sweeps/audit.py --storage runs/digits-audit       # the digits study: 3 seeds (make audit)
    python sweeps/audit.py --scale demo --seeds 1 --attack pgd mifgsm pgd-conv apgd-ce square \
        transfer-teacher tol-1e-1                            # make demo: one seed, NODE(1), 2.5-10 min
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
