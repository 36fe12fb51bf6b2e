"""Figure 1: accuracy vs eps (0..20/255) under PGD and MI-FGSM of the ResNet teacher, NODE(1),
NODE(100) and their KD students (ResNet44, T = 10 unless --teacher / --T).

    python sweeps/figure1.py --dataset cifar10 svhn
    python sweeps/figure1.py --dataset digits --smoke-test
"""
import sys

try:  # Ctrl-C while torch and Ray load: one line, exit 130
    from nodekd_ray.orchestration import main
    from nodekd_ray.sweep import PRESETS
except KeyboardInterrupt:
    sys.exit(print(f"{sys.argv[0]}: interrupted while starting; nothing was written", file=sys.stderr) or 130)

if __name__ == "__main__":
    sys.exit(main([PRESETS["figure1"]], description=__doc__))
