"""The Task protocol and its registry."""

from __future__ import annotations

import abc
from collections.abc import Callable

import torch
from torch import nn

from mm_ptft.config import Config, ConfigError
from mm_ptft.data import Collator, SampleDecoder, create_transform
from mm_ptft.registry import Registry


class Task(nn.Module, abc.ABC):
    """A trainable unit: ``self.model`` (what checkpoints and exports hold) plus what turns a batch into a loss.

    A task also says what its data look like: ``decoder`` turns a raw shard sample into a dict (or None when the
    sample is unusable), ``collator`` stacks those dicts into a batch, ``dummy_batch`` is a minimal batch for ranks
    that must run a forward pass without data (ZeRO-3 evaluation). The defaults decode an image, its caption
    (when ``needs_caption``) and the label from the shard's json.
    """

    needs_caption: bool = True
    needs_image: bool = True

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @abc.abstractmethod
    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """Batch → dict with a scalar ``loss`` and any detached metrics to log."""

    def decoder(self, cfg: Config, train: bool, mean: list[float], std: list[float]) -> Callable:
        image = cfg.model.image
        transform = create_transform(cfg.data.image, image.image_size, image.in_chans, mean, std, train)
        return SampleDecoder(
            transform if self.needs_image else None,
            cfg.data.image_keys,
            cfg.data.caption_key,
            cfg.data.max_caption_chars,
            need_caption=self.needs_caption,
            need_image=self.needs_image,
        )

    def collator(self, tokenize: Callable[[list[str]], dict] | None) -> Callable:
        return Collator(tokenize if self.needs_caption else None)

    def dummy_batch(self, cfg: Config, tokenize: Callable[[list[str]], dict] | None) -> dict:
        batch: dict = {"label": torch.zeros(1, dtype=torch.long), "key": ["<dummy>"]}
        if self.needs_image:
            size = cfg.model.image.image_size
            batch["image"] = torch.zeros(1, cfg.model.image.in_chans, size, size)
        if self.needs_caption and tokenize is not None:
            batch.update(tokenize([""]))
        return batch


TASKS: Registry[Task] = Registry("task")


def create_task(cfg: Config, rank: int = 0, world_size: int = 1) -> Task:
    if cfg.task not in TASKS:
        raise ConfigError(f"config: unknown task '{cfg.task}'; registered: {', '.join(TASKS.list())}")
    return TASKS.create(cfg.task, cfg, rank=rank, world_size=world_size)
