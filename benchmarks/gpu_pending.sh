#!/usr/bin/env bash
# The GPU measurements still to take (README, "dopri5 with fewer device operations" and "Half the
# activation memory per NFE"), in one command of about 6 minutes on an H100:
#   1. check_gpu.py: every option against an fp64 copy on the GPU, --solver-impl nodekd,
#      --recompute, --bf16-norms and --norm-impl triton included (are they correct under cuDNN,
#      CUDA's autocast and compiled Triton?);
#   2. bench_solver.py: operations, solver time and student time, torchdiffeq's dopri5 against
#      nodekd's, at batch 128 and width 512;
#   2b. bench_norm.py: GroupNorm + ReLU per call and f alone, PyTorch's ops against the Triton
#      kernels (--norm-impl triton), and their operation counts at tf32 and bf16;
#   3. bench_student.py: images/s of tf32 and bf16 with each dopri5, with bf16 norms, with
#      recompute and with the Triton norms, against the fp32 baseline; peak memory per backward
#      variant at t1 = 1, 100 and 500. Its --out file is a costs file.
# Each output goes to OUT_DIR as it is made, so a run cut short keeps what finished.
#
#     bash benchmarks/gpu_pending.sh OUT_DIR [PYTHON]      # from the repository root, PYTHONPATH=.
set -euo pipefail
out=${1:?usage: gpu_pending.sh OUT_DIR [PYTHON]}
py=${2:-python3}
mkdir -p "$out"
$py -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_pending.sh: no CUDA device here')"
step() {   # one measurement into $out/NAME.txt; a failing one (a check that fails) does not stop the rest
    local name=$1; shift
    "$@" 2>&1 | tee "$out/$name.txt" || echo "gpu_pending.sh: $name exited non-zero; going on" | tee -a "$out/$name.txt"
}
step check_gpu $py benchmarks/check_gpu.py --seeds 2
step bench_solver $py benchmarks/bench_solver.py
step bench_norm $py benchmarks/bench_norm.py
step bench_student $py benchmarks/bench_student.py --options fp32-concat tf32 tf32+nodekd bf16 bf16+nodekd \
    bf16+norms+nodekd tf32+nodekd+recompute tf32+triton bf16+triton bf16+triton+nodekd \
    --memory 1 100 500 --out "$out/rates.json"
