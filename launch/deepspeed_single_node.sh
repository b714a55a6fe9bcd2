#!/usr/bin/env bash
# One machine, NPROC ranks under the deepspeed launcher.
#   NPROC=2 launch/deepspeed_single_node.sh configs/pretrain-fmnist.yaml [dotted overrides…]
# On a CPU machine each rank runs with 1 thread (2 ranks × 1 thread beats 1 rank × 2 threads on 2 cores);
# on a GPU machine NPROC is the number of GPUs.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: $0 CONFIG [overrides…]}; shift
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/deepspeed --num_gpus "${NPROC:-2}" --module mm_ptft train --config "$CONFIG" "$@"
