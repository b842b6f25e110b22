#!/usr/bin/env bash
# The GPU run: benchmarks/gpu_smoke.py's checks (pass / fail: what only a GPU can show), then
# benchmarks/gpu_bench.py's measurements; their docstrings say what each check and section does.
#
#   bash benchmarks/gpu.sh                                     # one H100/H200, under 8 minutes
#   bash benchmarks/gpu.sh --device cpu --smoke --out /tmp/x   # tiny sizes on the CPU, about 30 s
#
# Writes gpu_smoke.{json,md}, gpu_smoke_logs/ and gpu_bench.{json,md} to $OUT when it is set,
# else to --out DIR (default benchmarks/results/). Both scripts get these arguments (the bench's
# options; gpu_smoke.py uses --device, --smoke, --out and --commit of them). Exit code: the
# checks' if they failed, else the bench's. Python: $PYTHON if set, else the first of the repo's
# .venv, python and python3 that has torch (a GPU machine's image may hold torch under python3 only).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

has_torch() {
    # find_spec, not an import: the probe costs milliseconds, not torch's start-up.
    "$1" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("torch") is None)' 2>/dev/null
}

py="${PYTHON:-}"
if [[ -z "$py" ]]; then
    for candidate in "$repo/.venv/bin/python" python python3; do
        if command -v "$candidate" >/dev/null 2>&1 && has_torch "$candidate"; then
            py="$candidate"
            break
        fi
    done
fi
if [[ -z "$py" ]]; then
    echo "gpu.sh: no python with torch found (set PYTHON=/path/to/python)" >&2
    exit 2
fi

# The project's packages come from its editable install (pyproject.toml). A python without it (a
# GPU image's own) gets the same names through PYTHONPATH: the repo, and `irn` as a link to
# first-stage/irn.
if ! "$py" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("irn") is None)' 2>/dev/null; then
    shim="$(mktemp -d)"
    ln -s "$repo/first-stage/irn" "$shim/irn"
    export PYTHONPATH="$repo:$shim${PYTHONPATH:+:$PYTHONPATH}"
fi

# Both scripts find the repo from their own path, so relative --out paths stay the caller's.
smoke=("$py" "$repo/benchmarks/gpu_smoke.py")
bench=("$py" "$repo/benchmarks/gpu_bench.py")
# Seconds for the whole run: the checks take at most 180 (their --checks-budget-s), and the
# bench starts no row after what they left of this; its last row and start-up add ~30 s, so
# the run ends within 8 minutes.
total_s=440

side_by_side=0
for arg in "$@"; do
    if [[ "$arg" == "--smoke" ]]; then
        side_by_side=1
    fi
done
smoke_rc=0
bench_rc=0
if (( side_by_side )); then
    # Smoke sizes measure nothing, and the bench's single thread leaves the host's other
    # cores to the checks: side by side, the test suite's run stays short.
    "${bench[@]}" "$@" &
    bench_pid=$!
    "${smoke[@]}" "$@" || smoke_rc=$?
    wait "$bench_pid" || bench_rc=$?
else
    # One after the other, so no check's process shares the GPU with a timed row.
    SECONDS=0
    "${smoke[@]}" "$@" || smoke_rc=$?
    budget=$(( total_s - SECONDS ))
    (( budget > 0 )) || budget=0
    # A --budget-s given to gpu.sh comes later and wins.
    "${bench[@]}" --budget-s "$budget" "$@" || bench_rc=$?
fi
(( smoke_rc == 0 )) || exit "$smoke_rc"
exit "$bench_rc"
