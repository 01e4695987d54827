#!/usr/bin/env bash
# Multi-process training with torchrun, as mmdet's tools/dist_train.sh.
#   [NNODES=1] [NODE_RANK=0] [MASTER_ADDR=127.0.0.1] [PORT=29500] \
#   bash tools/dist_train.sh CONFIG NPROC [train.py options...]
# NPROC processes on this node; for several nodes run it on each with the
# same NNODES, MASTER_ADDR and PORT and its own NODE_RANK (0 on the master).
# On CPU the config's env_cfg.dist_cfg.backend must be 'gloo'.
set -euo pipefail
CONFIG=$1
NPROC=$2
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-"127.0.0.1"}
PYTHON=${PYTHON:-python}
PYTHONPATH="$(dirname "$0")/..${PYTHONPATH:+:$PYTHONPATH}" \
"$PYTHON" -m torch.distributed.run \
    --nnodes="$NNODES" \
    --node_rank="$NODE_RANK" \
    --master_addr="$MASTER_ADDR" \
    --nproc_per_node="$NPROC" \
    --master_port="$PORT" \
    "$(dirname "$0")/train.py" \
    "$CONFIG" \
    --launcher pytorch "${@:3}"
