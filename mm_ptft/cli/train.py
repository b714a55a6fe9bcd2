"""``mm-ptft train``, ``mm-ptft config`` and ``mm-ptft consolidate``."""

from __future__ import annotations

import argparse
from pathlib import Path

from mm_ptft.cli.base import COMMANDS, config_parser


@COMMANDS.register("train")
def cmd_train(argv: list[str]) -> int:
    """Pretrain or fine-tune as the config's task says (1 process, or under deepspeed / torchrun)."""
    from mm_ptft.config import load_config

    args = config_parser("train", cmd_train.__doc__).parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    from mm_ptft.train.trainer import Trainer

    Trainer(cfg, local_rank=args.local_rank).train()
    return 0


@COMMANDS.register("config")
def cmd_config(argv: list[str]) -> int:
    """Print the resolved config (file + overrides, the sections its task uses) as YAML."""
    import yaml

    from mm_ptft.config import config_to_dict, load_config
    from mm_ptft.tasks import configure_task

    args = config_parser("config", cmd_config.__doc__).parse_args(argv)
    cfg = configure_task(load_config(args.config, args.overrides))
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
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
    tag_dir = ckpt.find_checkpoint(Path(args.source))
    out = Path(args.out) if args.out else tag_dir / "model.safetensors"
    state = ckpt.consolidate(tag_dir, ema=not args.raw)
    ckpt.save_weights(state, out, {"source": str(tag_dir)})
    n = sum(v.numel() for v in state.values())
    what = "weight EMA" if not args.raw and (tag_dir / ckpt.EMA).is_file() else "weights"
    print(f"wrote {out} ({len(state)} tensors, {n / 1e6:.2f}M parameters, fp32 {what}) from {tag_dir}")
    return 0
