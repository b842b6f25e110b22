#!/usr/bin/env bash
# Re-test the lowest torch / torchvision that requirements.txt admits.
#
#   tools/check_torch_floor.sh [VENV_DIR] [EXTRA PYTEST ARGS...]
#
# Reads the floors from requirements.txt (the "torch>=X" and "torchvision>=Y" lines),
# builds a virtual environment in VENV_DIR (default: a new temporary folder; an existing
# one is reused) holding exactly torch==X and torchvision==Y, installs requirements.txt and
# requirements-test.txt with those two pinned (pip may not upgrade them), checks what sets
# the floor (the APIs, which the CPU-only fast tests do not all reach, and a gloo deadlock of
# torch <= 2.7 at the end of multi-process runs), then runs the fast tests,
# pytest -m "not slow", from the repository root.
#
# Needs a Python (PYTHON, default python3) that has wheels of that torch, and PyPI:
# PyPI's Linux wheels are CUDA builds, a few GB with their nvidia-* dependencies.
# Example: tools/check_torch_floor.sh /tmp/venv-torchmin -k "amp or distributed"
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$(mktemp -d -t torch-floor-XXXXXX)}"
if [[ $# -gt 0 ]]; then shift; fi

floor() {  # floor NAME: the version after "NAME>=" in requirements.txt
    sed -nE "s/^$1[[:space:]]*>=[[:space:]]*([0-9][0-9.]*).*/\1/p" "$repo/requirements.txt" | head -n 1
}
torch_v="$(floor torch)"
vision_v="$(floor torchvision)"
if [[ -z $torch_v || -z $vision_v ]]; then
    echo "requirements.txt has no torch>= / torchvision>= line" >&2
    exit 2
fi
echo "== torch $torch_v, torchvision $vision_v in $venv"

"${PYTHON:-python3}" -m venv "$venv"
py="$venv/bin/python"
pins="$venv/floor-constraints.txt"
printf 'torch==%s\ntorchvision==%s\n' "$torch_v" "$vision_v" > "$pins"
"$py" -m pip install --disable-pip-version-check -c "$pins" \
    -r "$repo/requirements.txt" -r "$repo/requirements-test.txt"
"$py" -m pip install --disable-pip-version-check --quiet --no-deps -e "$repo"  # as make venv does

echo "== the APIs that set the floor"
"$py" - <<'EOF'
import inspect, io
import numpy as np, torch, torch.distributed as dist, torchvision

print("torch", torch.__version__, "torchvision", torchvision.__version__, "numpy", np.__version__)
torch.amp.GradScaler("cuda", enabled=False)                                  # 2.3: main.py
assert "device_id" in inspect.signature(dist.init_process_group).parameters  # 2.3: utils/distributed.py
p = torch.nn.Parameter(torch.ones(3))
p.grad = torch.ones(3)
for opt in (torch.optim.SGD, torch.optim.AdamW):                              # 2.4 on the CPU: models/build.py
    opt([p], lr=0.1, fused=True).step()
torch.backends.mkldnn.deterministic                                          # 2.5: utils/runtime.py, tests
try:                                                                         # 2.6: (fn, "path") entries,
    from numpy._core.multiarray import _reconstruct                          # first-stage/irn/step/gen_mask.py
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct
buf = io.BytesIO()
torch.save({"pred": np.arange(3)}, buf)
allowed = [np.ndarray, np.dtype, type(np.dtype(np.int64)), (_reconstruct, f"{_reconstruct.__module__}._reconstruct")]
with torch.serialization.safe_globals(allowed):
    assert torch.load(io.BytesIO(buf.getvalue()), weights_only=True)["pred"].tolist() == [0, 1, 2]
print("all present")
EOF

echo "== 2.8: gloo ranks leave destroy_process_group after object collectives (to 2.7 a GIL deadlock hit ~1 run in 8)"
cat > "$venv/gloo_exit_check.py" <<'EOF'
import datetime, os, socket, torch.distributed as dist, torch.multiprocessing as mp

def rank_main(rank: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    dist.broadcast_object_list([rank], src=0)  # as main.py, datasets/verify.py do before cleanup()
    dist.all_gather_object([None, None], rank)
    dist.destroy_process_group()

if __name__ == "__main__":
    ctx = mp.get_context("spawn")
    for run in range(20):  # misses a 1-in-8 deadlock 7 % of the time
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs = [ctx.Process(target=rank_main, args=(r, port)) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(90)
        if any(p.is_alive() or p.exitcode for p in procs):
            for p in procs:
                p.kill()
            raise SystemExit(f"run {run}: a rank hung or failed in destroy_process_group")
    print("20 runs, every rank exited")
EOF
"$py" "$venv/gloo_exit_check.py"

echo "== fast tests"
cd "$repo"
"$py" -m pytest -q -m "not slow" -p no:cacheprovider --basetemp "$venv/pytest-tmp" "$@" tests
