"""``mm-ptft`` command line: ``main(argv)`` with subcommands, callable from tests.

    mm-ptft train --config configs/pretrain-fmnist.yaml train.steps=200 model.image.name=resnet18
    mm-ptft eval --model runs/pretrain-fmnist [eval.data=…]
    mm-ptft consolidate runs/pretrain-fmnist [--out model.safetensors]
    mm-ptft report runs/pretrain-fmnist
    mm-ptft config --config configs/pretrain-fmnist.yaml [overrides…]     (print the resolved config)
    mm-ptft data fashion-mnist --out data/fmnist                          (= python -m data_tools …)
    mm-ptft wise-ft runs/finetune-fmnist [--alphas 0,0.5,1] [eval.split=test]   (zero-shot ↔ fine-tuned interpolation)
    mm-ptft diff runs/pretrain-fmnist runs/finetune-fmnist --probe data/fmnist  (weight change + CKA per layer)
    mm-ptft export runs/pretrain-fmnist --out export/ [--to timm transformers open_clip onnx]
    mm-ptft clip-benchmark eval --model runs/pretrain-fmnist --dataset wds/fmnist --dataset_root data/fmnist-cb

Errors a person can act on (a bad config key, a missing shard, an unusable checkpoint) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from mm_ptft.registry import Registry

COMMANDS: Registry[Callable[[list[str]], int]] = Registry("command")


def _user_errors() -> tuple[type[BaseException], ...]:
    from mm_ptft.checkpoint import CheckpointError
    from mm_ptft.config import ConfigError
    from mm_ptft.data import DataError
    from mm_ptft.distributed.engine import UnsafeCheckpointError
    from mm_ptft.export.source import ExportError

    return ConfigError, DataError, CheckpointError, UnsafeCheckpointError, ExportError


def _one_line(e: BaseException) -> str:
    # errors re-raised from DataLoader workers carry the worker's traceback: keep only the final message
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(e).__name__


def _config_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"mm-ptft {prog}", description=description)
    p.add_argument("--config", "-c", help="YAML config (may inherit with `base:`)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=200")
    return p


@COMMANDS.register("train")
def cmd_train(argv: list[str]) -> int:
    """Pretrain or fine-tune as the config's task says (1 process, or under deepspeed / torchrun)."""
    from mm_ptft.config import load_config

    args = _config_parser("train", cmd_train.__doc__).parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    from mm_ptft.train.trainer import Trainer

    trainer = Trainer(cfg, local_rank=args.local_rank)
    trainer.train()
    return 0


@COMMANDS.register("config")
def cmd_config(argv: list[str]) -> int:
    """Print the resolved config (file + overrides) as YAML."""
    import yaml

    from mm_ptft.config import config_to_dict, load_config

    args = _config_parser("config", cmd_config.__doc__).parse_args(argv)
    print(yaml.safe_dump(config_to_dict(load_config(args.config, args.overrides)), sort_keys=False), end="")
    return 0


@COMMANDS.register("consolidate")
def cmd_consolidate(argv: list[str]) -> int:
    """Write consolidated fp32 weights (safetensors) from a run dir or checkpoint dir of any ZeRO stage."""
    from mm_ptft import checkpoint as ckpt

    p = argparse.ArgumentParser(prog="mm-ptft consolidate", description=cmd_consolidate.__doc__)
    p.add_argument("source", help="run directory, its checkpoints/ dir, or one checkpoint tag dir")
    p.add_argument("--out", help="output .safetensors (default: <source>/model.safetensors or <tag>/model.safetensors)")
    p.add_argument("--raw", action="store_true", help="with train.ema_decay: the optimizer's weights, not the EMA")
    args = p.parse_args(argv)
    source = Path(args.source)
    tag_dir = source
    if not ckpt.is_complete(source):
        base = source / "checkpoints" if (source / "checkpoints").is_dir() else source
        tag_dir = ckpt.resolve_resume(base, "latest")
        if tag_dir is None:
            raise ckpt.CheckpointError(f"checkpoint: no complete checkpoint under {source}")
    out = Path(args.out) if args.out else tag_dir / "model.safetensors"
    state = ckpt.consolidate(tag_dir, ema=not args.raw)
    ckpt.save_weights(state, out, {"source": str(tag_dir)})
    n = sum(v.numel() for v in state.values())
    what = "weight EMA" if not args.raw and (tag_dir / ckpt.EMA).is_file() else "weights"
    print(f"wrote {out} ({len(state)} tensors, {n / 1e6:.2f}M parameters, fp32 {what}) from {tag_dir}")
    return 0


@COMMANDS.register("report")
def cmd_report(argv: list[str]) -> int:
    """(Re)write a run's report.md and plots from its metrics.jsonl."""
    from mm_ptft.report import main as report_main

    return report_main(argv)


@COMMANDS.register("eval")
def cmd_eval(argv: list[str]) -> int:
    """Evaluate a trained model (zero-shot classification, retrieval) on held-out shards."""
    from mm_ptft.evaluate import main as eval_main

    return eval_main(argv)


@COMMANDS.register("wise-ft")
def cmd_wise_ft(argv: list[str]) -> int:
    """WiSE-FT: evaluate interpolations of a run's zero-shot and fine-tuned classifier weights."""
    from mm_ptft.finetune.wise_ft import main as wise_ft_main

    return wise_ft_main(argv)


@COMMANDS.register("diff")
def cmd_diff(argv: list[str]) -> int:
    """Per-layer weight change and CKA between a pretrained and a fine-tuned tower."""
    from mm_ptft.analysis.diff import main as diff_main

    return diff_main(argv)


@COMMANDS.register("data")
def cmd_data(argv: list[str]) -> int:
    """Write or verify webdataset shards (the data_tools package)."""
    import data_tools

    return data_tools.main(argv)


@COMMANDS.register("export")
def cmd_export(argv: list[str]) -> int:
    """Export a trained model to timm, transformers, open_clip and ONNX (checked against the model's outputs)."""
    from mm_ptft.export.core import main as export_main

    return export_main(argv)


@COMMANDS.register("clip-benchmark")
def cmd_clip_benchmark(argv: list[str]) -> int:
    """Run CLIP_benchmark's own CLI with an `mm_ptft` model type (any mm-ptft checkpoint)."""
    from mm_ptft.export.clip_benchmark import main as clip_benchmark_main

    return clip_benchmark_main(argv)


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


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
