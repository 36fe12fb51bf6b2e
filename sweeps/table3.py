"""Table 3: NODE(500) without KD on CIFAR10, attacked with PGD at eps = 8, 12, 16, 20 /255.

    python sweeps/table3.py                                   # CIFAR10, the paper's scale
    python sweeps/table3.py --dataset digits --smoke-test
"""
import sys

try:  # Ctrl-C while torch and Ray load: one line, exit 130
    from nodekd_ray.orchestration import main
    from nodekd_ray.sweep import PRESETS
except KeyboardInterrupt:
    sys.exit(print(f"{sys.argv[0]}: interrupted while starting; nothing was written", file=sys.stderr) or 130)

if __name__ == "__main__":
    sys.exit(main([PRESETS["table3"]], description=__doc__, default_datasets=("cifar10",)))
