"""``mm-ptft`` command line: ``main(argv)`` with subcommands, callable from tests. The only place with argparse.

    mm-ptft train --config configs/pretrain-fmnist.yaml train.steps=200 model.image.name=resnet18
    mm-ptft eval --model runs/pretrain-fmnist [eval.data=…]
    mm-ptft consolidate runs/pretrain-fmnist [--out model.safetensors]
    mm-ptft report runs/pretrain-fmnist
    mm-ptft config --config configs/pretrain-fmnist.yaml [overrides…]     (print the resolved config)
    mm-ptft data fashion-mnist --out data/fmnist                          (= python -m data_tools …)
    mm-ptft wise-ft runs/finetune-fmnist [--alphas 0,0.5,1] [eval.split=test]   (zero-shot ↔ fine-tuned interpolation)
    mm-ptft diff runs/pretrain-fmnist runs/finetune-fmnist --probe data/fmnist  (weight change + CKA per layer)
    mm-ptft export runs/pretrain-fmnist --out export/ [--to timm transformers open_clip onnx]
    mm-ptft sweep -c configs/finetune/fmnist-cnn-full.yaml --space configs/sweep/fmnist-cnn-space.yaml --out DIR
                  --trials 12 [--timeout-min 60] [--ranks 2]        (Optuna search over fine-tuning strategies)
    mm-ptft clip-benchmark eval --model runs/pretrain-fmnist --dataset wds/fmnist --dataset_root data/fmnist-cb

Errors a person can act on (a bad config key, a missing shard, an unusable checkpoint) print one line and exit 2.
Each command is a function registered in ``COMMANDS`` by a module of this package; library functions take typed
arguments and return results.
"""

from __future__ import annotations

import os
import re
import sys
import warnings

from mm_ptft.cli import evaluate, export, sweep, train  # noqa: F401 - register their commands
from mm_ptft.cli.base import COMMANDS


def _user_errors() -> tuple[type[BaseException], ...]:
    from mm_ptft.checkpoint import CheckpointError
    from mm_ptft.config import ConfigError
    from mm_ptft.data import DataError
    from mm_ptft.distributed.engine import UnsafeCheckpointError
    from mm_ptft.export.source import ExportError

    return ConfigError, DataError, CheckpointError, UnsafeCheckpointError, ExportError


def _one_line(e: BaseException) -> str:
    # errors re-raised from DataLoader workers carry the worker's traceback: keep only the final message
    # (whose last line is the traceback's "module.ErrorType: message")
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    last = lines[-1].strip()
    if len(lines) > 1:
        last = re.sub(rf"^[\w.]*\b{type(e).__name__}: ", "", last)
    return last


def _quiet_known_deprecations() -> None:
    # third-party deprecation chatter repeated by every rank on every step; not actionable by a user of mm-ptft
    for module in ("open_clip.loss", "torch.distributed", "deepspeed"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
    warnings.filterwarnings("ignore", message=".*all_gather.* is deprecated.*")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_known_deprecations()
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("commands: " + ", ".join(COMMANDS.list()))
        return 0 if argv else 2
    # the deepspeed launcher puts --local_rank=N first; move it behind the command name
    lead = [a for a in argv if a.startswith("--local_rank") or a.startswith("--local-rank")]
    rest = [a for a in argv if a not in lead]
    command, args = rest[0], rest[1:] + lead
    if command not in COMMANDS:
        print(f"error: unknown command '{command}'; commands: {', '.join(COMMANDS.list())}", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return COMMANDS.get(command)(args)
    except _user_errors() as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        sys.stdout.flush()


__all__ = ["COMMANDS", "main"]
