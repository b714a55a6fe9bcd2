"""Contrastive losses: InfoNCE (CLIP) with cross-rank feature gather, and SigLIP's sigmoid loss.

Both reuse open_clip's implementations; this module adapts them to mm-ptft's model output dict and registry.
Rank and world size are given by the caller (the task builder), so the loss never initialises a process group.
A new loss is one class registered in ``LOSSES``: ``__init__(cfg, rank, world_size)``, ``forward(model output) ->
{"loss"}``, and a ``check_config(cfg)`` classmethod for what it needs of the rest of the config.
"""

from __future__ import annotations

import torch
from open_clip import loss as open_clip_loss
from torch import nn

from mm_ptft.config import ConfigError, LossConfig
from mm_ptft.registry import Registry

LOSSES: Registry[nn.Module] = Registry("loss")


def _features(out: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    # losses run in fp32 (outside autocast too) even when the towers run in bf16: logits need the mantissa
    bias = out.get("logit_bias")
    return (
        out["image_features"].float(),
        out["text_features"].float(),
        out["logit_scale"].float(),
        bias.float() if bias is not None else None,
    )


@LOSSES.register("clip")
class ClipLoss(nn.Module):
    """Symmetric InfoNCE over the global batch (open_clip's ClipLoss).

    With ``gather_with_grad`` the features of every rank are all-gathered with gradient, so the gradient averaged
    over ranks equals the single-process gradient of the concatenated batch. ``local_loss`` computes only the local
    rows against all columns: the same mean loss and gradient, with a (B_local × B_global) logit matrix.
    """

    @classmethod
    def check_config(cls, cfg) -> None:
        """Nothing beyond its own section."""

    def __init__(self, cfg: LossConfig, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.impl = open_clip_loss.ClipLoss(
            local_loss=cfg.local_loss,
            gather_with_grad=cfg.gather_with_grad,
            cache_labels=True,
            rank=rank,
            world_size=world_size,
        )

    def forward(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        image, text, scale, bias = _features(out)
        with torch.autocast(image.device.type, enabled=False):
            return {"loss": self.impl(image, text, scale, bias)}


@LOSSES.register("siglip")
class SigLipLoss(nn.Module):
    """Pairwise sigmoid loss (SigLIP, open_clip's SigLipLoss) with neighbour exchange of text features."""

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.model.logit_bias_init is None:
            raise ConfigError("config: loss.name=siglip needs model.logit_bias_init (e.g. -10)")

    def __init__(self, cfg: LossConfig, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.impl = open_clip_loss.SigLipLoss(rank=rank, world_size=world_size)

    def forward(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        image, text, scale, bias = _features(out)
        if bias is None:
            raise ValueError("the siglip loss needs a logit bias: set model.logit_bias_init (e.g. -10)")
        with torch.autocast(image.device.type, enabled=False):
            return {"loss": self.impl(image, text, scale, bias)}


def create_loss(cfg: LossConfig, rank: int = 0, world_size: int = 1) -> nn.Module:
    return LOSSES.create(cfg.name, cfg, rank=rank, world_size=world_size)
