#!/usr/bin/env bash
# The GPU benchmark (benchmarks/gpu_bench.py; its docstring says what each section measures).
#
#   bash benchmarks/gpu.sh                                     # one H100/H200, under 8 minutes
#   bash benchmarks/gpu.sh --device cpu --smoke --out /tmp/x   # tiny sizes on the CPU, under a minute
#
# Writes gpu_bench.json and gpu_bench.md to $OUT when it is set, else to --out DIR (default
# benchmarks/results/). Python: $PYTHON if set, else the first of the repo's .venv, python and
# python3 that has torch (a GPU machine's image may hold torch under python3 only).
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

# The script finds the repo from its own path, so relative --out paths stay the caller's.
exec "$py" "$repo/benchmarks/gpu_bench.py" "$@"
