#!/usr/bin/env bash
# The GPU checks of --cuda-graphs (nodekd_ray/cuda_graphs.py), in one command sized for what was left of a
# 15-minute device lease (about 5 minutes): each step under its own time limit, its output in OUT_DIR/NAME.txt.
#   1. check_graphs.py: eager against graphed training steps at width 512, batch 128 (correctness);
#   2. bench_student.py: images/s of the default path (tf32 + nodekd + noise-aware) and bf16, with and without
#      the graphs and the Triton norms, against the fp32 path, with peak memory;
#   3. profile_graphed_step.py: f's MFU inside a training step, f's evaluations bracketed by CUDA events;
#   4. digits_precision.sh: a width-512 digits student (DIGITS_PRECISION, bf16 unless set) trained with the graphs
#      (accuracy, PGD).
#     PYTHONPATH=. [DIGITS_PRECISION=tf32] bash benchmarks/gpu_graphs.sh OUT_DIR [PYTHON]
set -uo pipefail
out=${1:?usage: gpu_graphs.sh OUT_DIR [PYTHON]}
py=${2:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
status=()
step() {
    local name=$1 limit=$2 t0=$SECONDS rc; shift 2
    echo "== $name (limit ${limit}s)"
    timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee "$out/$name.txt"
    rc=${PIPESTATUS[0]}
    status+=("$name: exit $rc after $((SECONDS - t0)) s")
}
step check_graphs 90 $py benchmarks/check_graphs.py
step profile 120 $py benchmarks/profile_graphed_step.py
step bench_student 120 $py benchmarks/bench_student.py --options fp32-concat tf32+nodekd+noise tf32+nodekd+noise+graphs \
    tf32+triton+nodekd+noise+graphs bf16+nodekd+noise bf16+nodekd+noise+graphs bf16+triton+nodekd+noise \
    bf16+triton+nodekd+noise+graphs --out "$out/rates.json"
dp=${DIGITS_PRECISION:-bf16}
step digits 95 env PRECISIONS=$dp KD_PRECISIONS= STUDENT_ARGS=--cuda-graphs bash benchmarks/digits_precision.sh /tmp/dg "$py"
cp /tmp/dg/node-$dp.log "$out/digits-node-$dp.log" 2>/dev/null
printf '%s\n' "== gpu_graphs.sh done in $SECONDS s" "${status[@]}" | tee "$out/status.txt"
