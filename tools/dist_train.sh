#!/usr/bin/env bash
# Train on GPUS processes per machine with torchrun (mmengine's `pytorch` launcher).
#   tools/dist_train.sh CONFIG GPUS [train.py options]
# Several machines: run it on each with NNODES, NODE_RANK, MASTER_ADDR (and PORT) set.
# Without CUDA the processes use the gloo backend on CPUs.
set -euo pipefail
CONFIG=$1
GPUS=$2
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-"127.0.0.1"}

PYTHONPATH="$(dirname "$0")/..${PYTHONPATH:+:$PYTHONPATH}" \
python -m torch.distributed.run \
    --nnodes="$NNODES" \
    --node_rank="$NODE_RANK" \
    --master_addr="$MASTER_ADDR" \
    --nproc_per_node="$GPUS" \
    --master_port="$PORT" \
    "$(dirname "$0")/train.py" \
    "$CONFIG" \
    --launcher pytorch "${@:3}"
