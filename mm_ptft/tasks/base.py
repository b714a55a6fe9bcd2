"""The Task protocol, its registry, and the task-owned parts of a config.

A task is ``model + loss → {"loss": …, metrics}``; the DeepSpeed engine wraps it and the Trainer never knows which
loss it trains. A task class registers itself with ``@TASKS.register(name)`` and says which optional config
sections it reads (``sections``: ``loss``, ``finetune``, ``detection``) and how to check them (``check_config``), so
a run's saved config holds what its task uses and nothing else.
"""

from __future__ import annotations

import abc
import copy
import dataclasses
import typing
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from mm_ptft.config import OPTIONAL_SECTIONS, Config, ConfigError
from mm_ptft.data import ImageTextSamples
from mm_ptft.registry import Registry


class Task(nn.Module, abc.ABC):
    """A trainable unit: ``self.model`` (what checkpoints and exports hold) plus what turns a batch into a loss.

    A task also says what its data look like: ``decoder`` turns a raw shard sample into a dict (or None when the
    sample is unusable), ``collator`` stacks those dicts into a batch, ``dummy_batch`` is a minimal batch for ranks
    that must run a forward pass without data (ZeRO-3 evaluation). The defaults (:class:`ImageTextSamples`) decode
    an image, its caption (when ``needs_caption``) and the label from the shard's json.
    """

    needs_caption: bool = True
    needs_image: bool = True
    sections: tuple[str, ...] = ()  # optional config sections this task reads (of OPTIONAL_SECTIONS)
    classnames: list[str] | None = None  # the classes a classifier scores, when it has them

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @classmethod
    @abc.abstractmethod
    def from_config(cls, cfg: Config, rank: int = 0, world_size: int = 1) -> Task:
        """Build the task (model, loss, initial weights) from a config :func:`configure_task` has checked."""

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Raise a one-line ConfigError for settings of this task that types alone cannot check."""

    @abc.abstractmethod
    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """Batch → dict with a scalar ``loss`` and any detached metrics to log."""

    def _samples(self) -> ImageTextSamples:
        return ImageTextSamples(need_image=self.needs_image, need_caption=self.needs_caption)

    def decoder(self, cfg: Config, train: bool, mean: list[float], std: list[float]) -> Callable:
        return self._samples().decoder(cfg, train, mean, std)

    def collator(self, tokenize: Callable[[list[str]], dict] | None) -> Callable:
        return self._samples().collator(tokenize)

    def dummy_batch(self, cfg: Config, tokenize: Callable[[list[str]], dict] | None) -> dict:
        return self._samples().dummy_batch(cfg, tokenize)


TASKS: Registry[type[Task]] = Registry("task")


def task_class(cfg: Config) -> type[Task]:
    if cfg.task not in TASKS:
        raise ConfigError(f"config: unknown task '{cfg.task}'; registered: {', '.join(TASKS.list())}")
    return TASKS.get(cfg.task)


def configure_task(cfg: Config) -> Config:
    """Give ``cfg`` exactly the optional sections its task reads (defaults where unset; the others dropped, as an
    inherited pretraining ``loss:`` in a fine-tuning recipe is) and run the task's own checks. In place; returns
    ``cfg``.

    Raises:
        ConfigError: an unknown task, or a setting the task refuses.
    """
    cls = task_class(cfg)
    hints = typing.get_type_hints(Config)
    for name in OPTIONAL_SECTIONS:
        if name in cls.sections:
            if getattr(cfg, name) is None:
                section_type = next(a for a in typing.get_args(hints[name]) if dataclasses.is_dataclass(a))
                setattr(cfg, name, section_type())
        else:
            setattr(cfg, name, None)
    cls.check_config(cfg)
    return cfg


def create_task(cfg: Config, rank: int = 0, world_size: int = 1) -> Task:
    """The task ``cfg.task`` names, built from ``cfg`` (configured first: see :func:`configure_task`)."""
    return task_class(configure_task(cfg)).from_config(cfg, rank=rank, world_size=world_size)


def check_text_tower(cfg: Config) -> None:
    """A task that runs the text tower needs it described: a local pretrained model or a config to build one."""
    if cfg.model.text.pretrained is None and not cfg.model.text.config:
        raise ConfigError("config: model.text needs either `pretrained` (a local path/alias) or `config` (random init)")


def for_loading(cfg: Config) -> Config:
    """The config that builds the same architecture without initialising it (trained weights are loaded next):
    no pretrained image file, no fine-tuning or detection init, a fine-tuned head of the trained kind."""
    from mm_ptft.finetune.init import head_input_of

    out = configure_task(copy.deepcopy(cfg))
    out.model.image.pretrained = None
    if out.finetune is not None:
        out.finetune.head_input = head_input_of(out)
        out.finetune.init, out.finetune.head_init = None, "random"
    if out.detection is not None:
        out.detection.init = None
    return out


def load_trained(source: str | Path, cfg: Config | None = None, overrides: list[str] | None = None):
    """(config, task in eval mode holding the trained fp32 weights) for a run dir, checkpoint dir or weights file.

    The config is the one saved beside the weights (``overrides`` applied) unless ``cfg`` is given.

    Raises:
        ConfigError: no config beside the weights and none given; CheckpointError: weights that do not fit.
    """
    from mm_ptft import checkpoint as ckpt

    cfg = configure_task(cfg if cfg is not None else ckpt.saved_config(source, overrides))
    task = create_task(for_loading(cfg))
    ckpt.load_model_weights(task.model, ckpt.load_weights(source), what=str(source))
    return cfg, task.eval()
