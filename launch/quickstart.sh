#!/usr/bin/env bash
# Set up, write Fashion-MNIST shards, pretrain (DeepSpeed ZeRO-2, bf16, NPROC ranks × 1 thread), evaluate zero-shot.
#   NPROC    ranks on this machine (default 2: one per core here; on a GPU machine, the number of GPUs)
#   CONFIG   recipe (default configs/pretrain-fmnist.yaml); extra arguments are dotted overrides
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
CONFIG=${CONFIG:-configs/pretrain-fmnist.yaml}
NAME=$(basename "$CONFIG" .yaml)
[ -f data/fmnist/dataset.json ] || .venv/bin/python -m data_tools fashion-mnist --out data/fmnist
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
.venv/bin/deepspeed --num_gpus "${NPROC:-2}" --module mm_ptft train --config "$CONFIG" "$@"
.venv/bin/mm-ptft eval --model "runs/$NAME" --out "runs/$NAME/eval.json" eval.data=data/fmnist "$@"
echo "quickstart: report at runs/$NAME/report.md, zero-shot results in runs/$NAME/eval.json"
