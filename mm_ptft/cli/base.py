"""The command registry and what every command shares: a config parser and the config of a trained model."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from mm_ptft.registry import Registry

COMMANDS: Registry[Callable[[list[str]], int]] = Registry("command")


def config_parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """``--config`` + dotted overrides (+ the ``--local_rank`` a launcher adds)."""
    p = argparse.ArgumentParser(prog=f"mm-ptft {prog}", description=description)
    p.add_argument("--config", "-c", help="YAML config (may inherit with `base:`)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=200")
    return p


def config_or_saved(sources: list[str], config: str | None, overrides: list[str]):
    """``--config`` with overrides when given, else the config saved beside the first source that has one."""
    from mm_ptft import checkpoint as ckpt
    from mm_ptft.config import load_config

    return load_config(config, overrides) if config else ckpt.saved_config(sources, overrides)
