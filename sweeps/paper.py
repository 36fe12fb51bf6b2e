"""The whole paper in one run: Tables 1-3 and Figure 1 into one storage folder (teachers are
trained once and shared by every table).

    python sweeps/paper.py --dataset cifar10 svhn
    python sweeps/paper.py --dataset digits --smoke-test --teacher resnet20 resnet32 --T 3 10
"""
import sys

try:  # Ctrl-C while torch and Ray load: one line, exit 130
    from nodekd_ray.orchestration import main
    from nodekd_ray.sweep import PRESETS
except KeyboardInterrupt:
    sys.exit(print(f"{sys.argv[0]}: interrupted while starting; nothing was written", file=sys.stderr) or 130)

if __name__ == "__main__":
    sys.exit(main([PRESETS[k] for k in ("table1", "table2", "table3", "figure1")], description=__doc__))
