#!/usr/bin/env bash
# The GPU checks of --cuda-graphs (nodekd_ray/speed/cuda_graphs.py), in one command sized for what is left of a
# 15-minute device lease (about 4 minutes): each step under its own time limit, its output in OUT_DIR/NAME.txt.
#   1. check_graphs.py --pereval: eager against graphed training steps at width 512, batch 128 (correctness),
#      the graphs taking a solve's shared inputs where f allows (the default), then per evaluation ("+pereval");
#   2. profile_graphed_step.py: f's MFU inside a training step, shared inputs against per-evaluation graphs;
#   3. profile_kernels.py: kernel time by kind, both kinds of graphs;
#   4. bench_student.py: images/s of the default path (tf32 + nodekd + noise-aware) and of the graphed rows
#      against the fp32 path, with peak memory;
#   5. digits_precision.sh: a width-512 digits student (DIGITS_PRECISION, bf16 unless set; Triton norms) trained
#      with the graphs (DIGITS_GRAPHS: shared, the default, or per-evaluation) (accuracy, PGD).
#     PYTHONPATH=. [DIGITS_PRECISION=tf32] [DIGITS_GRAPHS=per-evaluation] bash benchmarks/gpu_graphs.sh OUT_DIR [PYTHON]
set -uo pipefail
out=${1:?usage: gpu_graphs.sh OUT_DIR [PYTHON]}
py=${2:-python3}
mkdir -p "$out"
. "$(dirname "$0")/steps.sh"
step check_graphs 100 $py benchmarks/check_graphs.py --pereval
step profile 90 $py benchmarks/profile_graphed_step.py
step kernels 60 $py benchmarks/profile_kernels.py --options bf16+triton+nodekd+noise+graphs+pereval \
    bf16+triton+nodekd+noise+graphs
step bench_student 100 $py benchmarks/bench_student.py --options fp32-concat tf32+nodekd+noise \
    tf32+triton+nodekd+noise+graphs tf32+triton+nodekd+noise+graphs+pereval bf16+triton+nodekd+noise \
    bf16+triton+nodekd+noise+graphs bf16+triton+nodekd+noise+graphs+pereval --out "$out/rates.json"
dp=${DIGITS_PRECISION:-bf16}
ga="--node cuda_graphs=true --node norm_impl=triton --node graph_inputs=${DIGITS_GRAPHS:-shared}"
step digits 120 env PRECISIONS=$dp KD_PRECISIONS= STUDENT_ARGS="$ga" bash benchmarks/digits_precision.sh /tmp/dg "$py"
cp /tmp/dg/node-$dp.log "$out/digits-node-$dp.log" 2>/dev/null
finish gpu_graphs.sh
