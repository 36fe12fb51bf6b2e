"""The computation study (issue 27): the same checkpoints under the reference, TF32, bf16, noise-aware and
the fastest computation, and students trained under the reference, the default and the fastest path,
5 seeds each, without and with KD; a verdict per computation in OUT/audit.md. On one machine, no Ray.

    python sweeps/compute.py --out runs/compute-study                      # CPU preset, about an hour on 2 cores
    python sweeps/compute.py --preset gpu --out runs/compute-study-gpu     # width 512 on a GPU
    python sweeps/compute.py --preset smoke --seeds 2 --out /tmp/c         # plumbing only (tests)
"""
import sys

from nodekd_ray.compute_study import main

if __name__ == "__main__":
    sys.exit(main())
