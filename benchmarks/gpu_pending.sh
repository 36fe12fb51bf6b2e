#!/usr/bin/env bash
# The GPU measurements still to take (README, "dopri5 with fewer device operations" and "Half the
# activation memory per NFE"), in one command of about 5 minutes on an H100:
#   1. check_gpu.py: every option against an fp64 copy on the GPU, --solver-impl nodekd,
#      --recompute and --bf16-norms included (are they correct under cuDNN and CUDA's autocast?);
#   2. bench_solver.py: operations, solver time and student time, torchdiffeq's dopri5 against
#      nodekd's, at batch 128 and width 512;
#   3. bench_student.py: images/s of tf32 and bf16 with each dopri5, with bf16 norms and with
#      recompute, against the fp32 baseline; peak memory per backward variant at t1 = 1, 100 and
#      500. Its --out file is a costs file.
# Each output goes to OUT_DIR as it is made, so a run cut short keeps what finished.
#
#     bash benchmarks/gpu_pending.sh OUT_DIR [PYTHON]      # from the repository root, PYTHONPATH=.
set -euo pipefail
out=${1:?usage: gpu_pending.sh OUT_DIR [PYTHON]}
py=${2:-python3}
mkdir -p "$out"
$py -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_pending.sh: no CUDA device here')"
$py benchmarks/check_gpu.py --seeds 2 2>&1 | tee "$out/check_gpu.txt"
$py benchmarks/bench_solver.py 2>&1 | tee "$out/bench_solver.txt"
$py benchmarks/bench_student.py --options fp32-concat tf32 tf32+nodekd bf16 bf16+nodekd bf16+norms+nodekd \
    tf32+nodekd+recompute \
    --memory 1 100 500 --out "$out/rates.json" 2>&1 | tee "$out/bench_student.txt"
