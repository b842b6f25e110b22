#!/usr/bin/env bash
# BECO training on a SLURM cluster, one task per GPU across nodes (mmsegmentation's convention):
#
#   tools/slurm_train.sh PARTITION JOB_NAME CONFIG [key=value ...]
#   GPUS=8 GPUS_PER_NODE=4 tools/slurm_train.sh gpu beco_coco configs/beco_coco.yaml data.total_batch_size=16
#
# data.total_batch_size=16 keeps the paper's batch on any GPU count (4 per GPU on 4, 2 on 8);
# without it, data.batch_size is per GPU. Every task runs main.py; inside this srun step
# utils/distributed.slurm_env() turns SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID into
# RANK / WORLD_SIZE / LOCAL_RANK, and MASTER_ADDR is the step's first node. SLURM sends SIGTERM
# on preemption and SIGTERM_GRACE seconds before the time limit (--signal): every rank stops
# at the same iteration, rank 0 writes latest_ckpt.pth, all wait for the write, and each exits
# with 143; resubmit with --ckpt <run>/latest_ckpt.pth after the overrides to continue
# (arguments after CONFIG go to main.py).
#
# Environment: GPUS (4), GPUS_PER_NODE (min(GPUS, 8)), CPUS_PER_TASK (5), SIGTERM_GRACE (120),
# SRUN_ARGS (extra srun options, e.g. "--qos=high"), PYTHON (python).
set -euo pipefail

if [ "$#" -lt 3 ]; then
    sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
PARTITION=$1
JOB_NAME=$2
CONFIG=$3
shift 3
GPUS=${GPUS:-4}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(( GPUS < 8 ? GPUS : 8 ))}
CPUS_PER_TASK=${CPUS_PER_TASK:-5}
SIGTERM_GRACE=${SIGTERM_GRACE:-120}
SRUN_ARGS=${SRUN_ARGS:-}
PYTHON=${PYTHON:-python}
REPO=$(cd "$(dirname "$0")/.." && pwd)

# The first node of the allocation hosts the rendezvous; scontrol knows the node names.
if [ -z "${MASTER_ADDR:-}" ] && command -v scontrol > /dev/null && [ -n "${SLURM_JOB_NODELIST:-}" ]; then
    export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
fi

# shellcheck disable=SC2086  # SRUN_ARGS is a list of options
exec srun -p "$PARTITION" --job-name="$JOB_NAME" \
    --gres=gpu:"$GPUS_PER_NODE" --ntasks="$GPUS" --ntasks-per-node="$GPUS_PER_NODE" \
    --cpus-per-task="$CPUS_PER_TASK" --kill-on-bad-exit=1 --signal=TERM@"$SIGTERM_GRACE" \
    $SRUN_ARGS \
    "$PYTHON" -u "$REPO/main.py" --config "$CONFIG" --logging_tag "$JOB_NAME" "$@"
