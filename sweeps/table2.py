"""Table 2: NODE students distilled from each ResNet, 5 teachers x T in {3, 10, 20} x t1 in
{1, 100} x 2 data sets = 60 student trials (teachers are trained first, or reused).

    ray submit cluster/gpu.yaml sweeps/table2.py              # the paper's scale
    python sweeps/table2.py --dataset digits --smoke-test     # minutes on a laptop
"""
import sys

try:  # Ctrl-C while torch and Ray load: one line, exit 130
    from nodekd_ray.orchestration import main
    from nodekd_ray.sweep import PRESETS
except KeyboardInterrupt:
    sys.exit(print(f"{sys.argv[0]}: interrupted while starting; nothing was written", file=sys.stderr) or 130)

if __name__ == "__main__":
    sys.exit(main([PRESETS["table2"]], description=__doc__))
