"""The Task protocol and its registry."""

from __future__ import annotations

import abc

import torch
from torch import nn

from mm_ptft.config import Config, ConfigError
from mm_ptft.registry import Registry


class Task(nn.Module, abc.ABC):
    """A trainable unit: ``self.model`` (what checkpoints and exports hold) plus what turns a batch into a loss.

    Subclasses set ``needs_caption`` (does the data pipeline tokenize captions?) and implement ``forward``.
    """

    needs_caption: bool = True

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @abc.abstractmethod
    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """Batch → dict with a scalar ``loss`` and any detached metrics to log."""


TASKS: Registry[Task] = Registry("task")


def create_task(cfg: Config, rank: int = 0, world_size: int = 1) -> Task:
    if cfg.task not in TASKS:
        raise ConfigError(f"config: unknown task '{cfg.task}'; registered: {', '.join(TASKS.list())}")
    return TASKS.create(cfg.task, cfg, rank=rank, world_size=world_size)
