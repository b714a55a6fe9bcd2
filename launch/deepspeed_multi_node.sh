#!/usr/bin/env bash
# Several machines under the deepspeed launcher, driven from the first host over ssh (pdsh).
#   HOSTFILE=launch/hostfile.example launch/deepspeed_multi_node.sh configs/pretrain-fmnist.yaml [overrides…]
# Every host needs the same checkout, the same .venv path and the shards at the same path (or URLs all can read);
# the run directory (train.output_dir) should be on a shared file system so checkpoints are complete in one place.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: $0 CONFIG [overrides…]}; shift
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/deepspeed --hostfile "${HOSTFILE:-launch/hostfile.example}" --master_addr "${MASTER_ADDR:-$(hostname -I | awk '{print $1}')}" \
    --master_port "${MASTER_PORT:-29500}" --module mm_ptft train --config "$CONFIG" "$@"
