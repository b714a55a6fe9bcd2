"""CLIP / SigLIP pretraining: dual encoder + contrastive loss."""

from __future__ import annotations

import torch
from torch import nn

from mm_ptft.config import Config, ConfigError
from mm_ptft.losses import LOSSES, create_loss
from mm_ptft.models import create_model
from mm_ptft.tasks.base import TASKS, Task


class ContrastiveTask(Task):
    needs_caption = True

    def __init__(self, model: nn.Module, loss: nn.Module):
        super().__init__(model)
        self.loss = loss

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        out = self.model(image=batch["image"], input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        metrics = {"loss": self.loss(out)["loss"], "logit_scale": out["logit_scale"].detach()}
        if "logit_bias" in out:
            metrics["logit_bias"] = out["logit_bias"].detach()
        return metrics


@TASKS.register("contrastive")
def build_contrastive(cfg: Config, rank: int = 0, world_size: int = 1) -> ContrastiveTask:
    if cfg.loss.name not in LOSSES:
        raise ConfigError(f"config: unknown loss.name '{cfg.loss.name}'; registered: {', '.join(LOSSES.list())}")
    if cfg.loss.name == "siglip" and cfg.model.logit_bias_init is None:
        raise ConfigError("config: loss.name=siglip needs model.logit_bias_init (e.g. -10)")
    return ContrastiveTask(create_model(cfg.model), create_loss(cfg.loss, rank=rank, world_size=world_size))
