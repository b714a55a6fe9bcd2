#!/usr/bin/env bash
# torchrun instead of the deepspeed launcher (mm-ptft reads RANK/WORLD_SIZE/LOCAL_RANK from the environment).
#   Single node:  NPROC=2 launch/torchrun.sh configs/pretrain-fmnist.yaml [overrides…]
#   Node i of N:  NNODES=N NODE_RANK=i MASTER_ADDR=host0 NPROC=8 launch/torchrun.sh configs/… [overrides…]
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: $0 CONFIG [overrides…]}; shift
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/torchrun --nnodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}" --nproc-per-node "${NPROC:-2}" \
    --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}" \
    -m mm_ptft train --config "$CONFIG" "$@"
