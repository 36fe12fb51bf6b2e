#!/usr/bin/env bash
# --cuda-graphs with channels_last (NHWC) on a GPU, sized for what was left of a device lease (about 4 minutes):
#   1. check_graphs.py: eager against graphed training steps in NHWC, bf16 and tf32 with the Triton norms;
#   2. profile_graphed_step.py: f's MFU inside a training step, NHWC against NCHW;
#   3. bench_student.py: images/s of the same options against the fp32 path;
#   4. digits_precision.sh: a width-512 bf16 NHWC + Triton + graphs digits student (accuracy, PGD).
#     PYTHONPATH=. bash benchmarks/gpu_channels_last.sh OUT_DIR [PYTHON]
set -uo pipefail
out=${1:?usage: gpu_channels_last.sh OUT_DIR [PYTHON]}
py=${2:-python3}
mkdir -p "$out"
. "$(dirname "$0")/steps.sh"
opts=(bf16+cl+triton+nodekd+noise+graphs bf16+triton+nodekd+noise+graphs tf32+cl+triton+nodekd+noise+graphs
      tf32+triton+nodekd+noise+graphs bf16+cl+nodekd+noise+graphs bf16+cl+triton+nodekd+noise)
step check_graphs 60 $py benchmarks/check_graphs.py --rows bf16+cl+triton tf32+cl+triton
step profile 75 $py benchmarks/profile_graphed_step.py --options "${opts[@]}"
step bench_student 75 $py benchmarks/bench_student.py --options fp32-concat "${opts[@]}" --out "$out/rates.json"
step digits 120 env PRECISIONS=bf16 KD_PRECISIONS= STUDENT_ARGS="--node cuda_graphs=true --node channels_last=true --node norm_impl=triton" \
    bash benchmarks/digits_precision.sh /tmp/dcl "$py"
finish gpu_channels_last.sh
