#!/usr/bin/env bash
# Claim (issue 11): each student precision keeps accuracy. How: on digits, the paper-width student
# (width 512, stem 64) trained for 20 epochs (Adam, batch 32, no crops: the digits recipe) without
# KD at fp32, tf32 and bf16, and with KD (ResNet20 teacher, T = 3) at tf32 and bf16; each one's
# clean test accuracy, NFE per step and seconds per epoch from its log, then 20-step PGD at
# eps 8/255 on 300 test images. Needs a GPU to finish in minutes.
#
#     bash benchmarks/digits_precision.sh OUT_DIR [PYTHON]
#     PRECISIONS="tf32 bf16" KD_PRECISIONS="" STUDENT_ARGS="--node solver_impl=nodekd --node step_control=noise-aware" ...
#                     # other precisions, or none; more train-student options for every student
set -euo pipefail
out=${1:?usage: digits_precision.sh OUT_DIR [PYTHON]}
py=${2:-python3}
mkdir -p "$out"
common=(--dataset digits --batch-size 32 --seed 0)
student=(--width 512 --stem-channels 64 --epochs 20 --optimizer adam --crop-padding 0 ${STUDENT_ARGS:-})
[ -f "$out/teacher.pt" ] || $py -m nodekd_ray.cli train-teacher "${common[@]}" --epochs 15 --out "$out/teacher.pt" 2>&1 | tail -2
run() {   # name, extra args
    local name=$1; shift
    [ -f "$out/$name.pt" ] || $py -m nodekd_ray.cli train-student "${common[@]}" "${student[@]}" "$@" \
        --out "$out/$name.pt" > "$out/$name.log" 2>&1
    tail -2 "$out/$name.log"
    $py -m nodekd_ray.cli attack "${common[@]}" --checkpoint "$out/$name.pt" --attack pgd --eps 0,8/255 \
        --steps 20 --limit-test 300 --out "$out/$name-pgd.parquet" --force 2>&1 | tail -3
}
for p in ${PRECISIONS-fp32 tf32 bf16}; do run "node-$p" --no-kd --node precision="$p"; done
for p in ${KD_PRECISIONS-tf32 bf16}; do run "node-kd-$p" --teacher "$out/teacher.pt" --T 3 --node precision="$p"; done
