#!/usr/bin/env bash
# The GPU benchmarks of docs/benchmarks.md in one call on a lent GPU machine. Each job runs
# under its own time limit, so a stuck job cannot use up the others' time, and each writes its
# JSON as it goes (bench_inference rewrites it after every row). Logs and JSON go to $OUT
# (the device tool's output folder), or ./gpu-out.
#
#   bash scripts/gpu_benchmarks.sh                  # the jobs not yet measured: train decode-int8
#   bash scripts/gpu_benchmarks.sh decode engine    # any of: train decode decode-int8 engine
#
# Wheels under .whl/ (bitsandbytes, open_clip_torch; see the device tool's README) are installed
# to /tmp/site first. The repository root goes on PYTHONPATH: the package is not installed there.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${OUT:-gpu-out}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "no nvidia-smi"
    python3 - <<'EOF'
import importlib

for name in ("torch", "transformers", "bitsandbytes", "open_clip", "peft", "accelerate"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:  # a missing one is reported, not fatal
        print(name, "missing:", type(exc).__name__, exc)
EOF
} >"$out/machine.txt"
cat "$out/machine.txt"

job() {  # job NAME LIMIT_S SCRIPT ARGS...
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    timeout "$limit" python3 "$@" >"$out/$name.log" 2>&1
    local status=$?
    echo "== $name: exit $status after $((SECONDS - start)) s (limit $limit s)"
    tail -n 25 "$out/$name.log"
    [ $status -eq 0 ] || failed=1
}

status=0 failed=0
jobs=("$@")
[ ${#jobs[@]} -eq 0 ] && jobs=(train decode-int8)
for name in "${jobs[@]}"; do
    case $name in
    train) job train 240 scripts/bench_train.py --json "$out/train.json" ;;
    decode) job decode 420 scripts/bench_inference.py --static-generate --modes bf16 nf4 \
        --json "$out/decode.json" ;;
    decode-int8) job decode-int8 300 scripts/bench_inference.py --static-generate --modes int8 \
        --json "$out/decode-int8.json" ;;
    engine) job engine 180 scripts/bench_engine.py --requests 2048 --repeats 2 \
        --json "$out/engine.json" ;;
    *)
        echo "unknown job $name (train, decode, decode-int8, engine)" >&2
        status=2
        ;;
    esac
done
[ $status -ne 0 ] && exit $status
exit $failed
