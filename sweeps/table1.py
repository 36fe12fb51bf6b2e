"""Table 1: the five ResNet teachers and NODE(1), NODE(100) without KD, clean accuracy.

    python sweeps/table1.py --dataset cifar10 svhn            # the paper's scale (GPU cluster)
    python sweeps/table1.py --dataset digits --smoke-test     # minutes on a laptop
"""
import sys

try:  # Ctrl-C while torch and Ray load: one line, exit 130
    from nodekd_ray.orchestration import main
    from nodekd_ray.sweep import PRESETS
except KeyboardInterrupt:
    sys.exit(print(f"{sys.argv[0]}: interrupted while starting; nothing was written", file=sys.stderr) or 130)

if __name__ == "__main__":
    sys.exit(main([PRESETS["table1"]], description=__doc__))
