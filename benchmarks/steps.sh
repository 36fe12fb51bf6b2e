# Sourced by the GPU check scripts (gpu_graphs.sh, gpu_channels_last.sh): `step NAME LIMIT_S CMD...` runs one
# check under its own time limit into $out/NAME.txt and records its exit status; `finish` writes $out/status.txt.
# A failing or overlong step does not stop the ones after it. Needs $out.
export PYTHONUNBUFFERED=1
status=()
step() {
    local name=$1 limit=$2 t0=$SECONDS rc; shift 2
    echo "== $name (limit ${limit}s)"
    timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee "$out/$name.txt"
    rc=${PIPESTATUS[0]}
    status+=("$name: exit $rc after $((SECONDS - t0)) s")
}
finish() {
    printf '%s\n' "== $1 done in $SECONDS s" "${status[@]}" | tee "$out/status.txt"
}
