#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian/Ubuntu machine: the real data packages, a virtualenv, torch and mm-ptft.
#   TORCH_SPEC   torch/torchvision to install (default: the builds this project is tested with)
#   PYTHON       interpreter for the virtualenv (default: python3)
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
[ -d /usr/share/datasets/fashion-mnist ] || need_apt+=(dataset-fashion-mnist)
[ -d /usr/share/games/fortunes ] || need_apt+=(fortunes)
[ -d /usr/share/openclipart/png ] || need_apt+=(openclipart-png)
if [ ${#need_apt[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "setup: apt-get install ${need_apt[*]}"
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: a range alone would pull a multi-GB CUDA build of the newest release
.venv/bin/python -m pip install -q ${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}
.venv/bin/python -m pip install -q -e ".[all]"
echo "setup: ok ($(.venv/bin/python -c 'import torch, deepspeed, timm, transformers, open_clip; print(f"torch {torch.__version__}, deepspeed {deepspeed.__version__}, timm {timm.__version__}, transformers {transformers.__version__}, open_clip {open_clip.__version__}")' 2>/dev/null))"
