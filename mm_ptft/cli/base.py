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


def saved_config(sources: list[str], config: str | None, overrides: list[str]):
    """``--config`` with overrides when given, else the config saved beside the first source that has one."""
    from mm_ptft import checkpoint as ckpt
    from mm_ptft.config import ConfigError, apply_overrides, config_from_dict, load_config

    if config:
        return load_config(config, overrides)
    for source in sources:
        data = ckpt.config_of(source)
        if data is not None:
            return config_from_dict(apply_overrides(data, overrides))
    raise ConfigError(f"config: no config.yaml beside {' or '.join(sources)}; pass --config")
