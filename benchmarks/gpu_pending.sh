#!/usr/bin/env bash
# The GPU measurements still to take for issue 11 (README, "Student speed on a GPU"), in one command
# sized for a 15-minute device lease: about 6 minutes of work on an H100 (estimated from the step times
# of the 2026-11-24 runs), each step under its own time limit, so that one that hangs (a Triton compile,
# say) cannot eat the lease: 560 s of limits in all. In order of what the next decision needs:
#   1. check_gpu.py: every option against an fp64 copy on the GPU, --solver-impl nodekd, --recompute,
#      --norm-impl triton and --step-control noise-aware included (are they correct under
#      cuDNN, CUDA's autocast and compiled Triton?). Speed figures of an option that fails here do not count;
#   2. bench_student.py: images/s of tf32 and bf16 with each dopri5, with recompute, with
#      the Triton norms and with noise-aware step control, against the fp32 baseline, and MFU in f; peak
#      memory per backward variant at t1 = 1, 100 and 500. Its --out file is a costs file (--dry-run --costs);
#   3. bench_step_control.py: NFE, errors against fp64 and seconds per training step of tf32 and bf16 with
#      plain and noise-aware step control, over 2 seeds x 3 training states (does measuring the noise cost
#      less than the steps it saves?);
#   4. bench_norm.py: GroupNorm + ReLU per call and f alone, PyTorch's ops against the Triton kernels,
#      and their operation counts at tf32 and bf16;
#   5. bench_solver.py: operations, solver time and student time, torchdiffeq's dopri5 against nodekd's,
#      at batch 128 and width 512.
# Each output goes to OUT_DIR/NAME.txt as it is made (unbuffered), so a run cut short keeps what finished;
# OUT_DIR/env.txt has the device, driver and versions. The last lines printed are each step's status.
# Needs torch, torchdiffeq and triton (the device image has them), not Ray.
#
#     PYTHONPATH=. bash benchmarks/gpu_pending.sh OUT_DIR [PYTHON]      # from the repository root
#     GPU_PENDING_SMOKE=1 ...    # on a CPU, every step with its --smoke sizes: the script's plumbing only
#                                # (tests/test_costs.py)
set -euo pipefail
out=${1:?usage: gpu_pending.sh OUT_DIR [PYTHON]}
py=${2:-python3}
mkdir -p "$out"
smoke=() horizons=(1 100 500) scale=1
if [ "${GPU_PENDING_SMOKE:-}" = 1 ]; then
    # 4x the limits: a CPU shared with other tests (make test's other worker). In a fresh clone's CI run
    # bench_student --smoke, 56 s alone, was still importing torch._dynamo when its 200 s limit came
    smoke=(--smoke) horizons=(1) scale=4
else
    $py -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_pending.sh: no CUDA device here')"
fi
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
  $py -c "import torch, torchdiffeq, triton; print('torch', torch.__version__, 'cuDNN', torch.backends.cudnn.version(),
'torchdiffeq', torchdiffeq.__version__, 'triton', triton.__version__)"; } > "$out/env.txt" 2>&1
cat "$out/env.txt"
status=()
step() {   # step NAME LIMIT_S CMD...: one measurement into $out/NAME.txt; a failing or overlong one does not stop the rest
    local name=$1 limit=$(($2 * scale)) t0=$SECONDS rc; shift 2
    echo "== $name (limit ${limit}s)"
    set +e
    timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee "$out/$name.txt"
    rc=${PIPESTATUS[0]}
    set -e
    case $rc in
        0) status+=("$name: ok in $((SECONDS - t0)) s") ;;
        124|137) status+=("$name: stopped at its ${limit} s limit; $out/$name.txt keeps what it printed") ;;
        *) status+=("$name: exit $rc after $((SECONDS - t0)) s (a failed check exits 1)") ;;
    esac
}
step check_gpu 150 $py benchmarks/check_gpu.py --seeds 2 "${smoke[@]}"
step bench_student 200 $py benchmarks/bench_student.py "${smoke[@]}" --options fp32-concat tf32 tf32+nodekd bf16 bf16+nodekd \
    tf32+nodekd+recompute tf32+triton bf16+triton bf16+triton+nodekd tf32+nodekd+noise \
    bf16+nodekd+noise bf16+triton+nodekd+noise --memory "${horizons[@]}" --out "$out/rates.json"
step bench_step_control 90 $py benchmarks/bench_step_control.py "${smoke[@]}" --seeds 2
step bench_norm 60 $py benchmarks/bench_norm.py "${smoke[@]}"
step bench_solver 60 $py benchmarks/bench_solver.py "${smoke[@]}"
printf '%s\n' "== gpu_pending.sh done in $SECONDS s" "${status[@]}" | tee "$out/status.txt"
