"""Image tower: any timm model by name, pooled by timm, projected into the joint embedding.

Single-device code: no deepspeed, no torch.distributed (a design-rule test enforces it).
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

from mm_ptft.config import ConfigError, ImageTowerConfig
from mm_ptft.models.heads import build_projection


def _create_trunk(cfg: ImageTowerConfig) -> nn.Module:
    kwargs = dict(cfg.kwargs)
    kwargs.setdefault("in_chans", cfg.in_chans)
    if cfg.pool is not None:
        kwargs["global_pool"] = cfg.pool
    if cfg.patch_dropout:
        if "patch_drop_rate" in kwargs:
            raise ConfigError("config: set patch dropout once: model.image.patch_dropout or kwargs.patch_drop_rate")
        kwargs["patch_drop_rate"] = cfg.patch_dropout
    if cfg.pretrained is not None:
        path = Path(cfg.pretrained).expanduser()
        if not path.is_file():
            raise ConfigError(f"config: model.image.pretrained file not found: {path} (nothing is downloaded)")
        # timm loads a local file through its own filters (head removal, in_chans adaptation)
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    if not timm.is_model(cfg.name):
        raise ConfigError(f"config: model.image.name '{cfg.name}' is not a timm model (see timm.list_models())")
    # ViT-style models take img_size; CNNs do not. Try with it, fall back without when the model rejects it.
    if "img_size" not in kwargs:
        try:
            return timm.create_model(cfg.name, num_classes=0, img_size=cfg.image_size, **kwargs)
        except TypeError as e:
            if "img_size" not in str(e):
                raise _rejected(cfg, e) from None
    try:
        return timm.create_model(cfg.name, num_classes=0, **kwargs)
    except TypeError as e:
        raise _rejected(cfg, e) from None


def _rejected(cfg: ImageTowerConfig, e: TypeError) -> ConfigError:
    if cfg.patch_dropout and "patch_drop_rate" in str(e):
        return ConfigError(f"config: model.image.patch_dropout needs a timm ViT; '{cfg.name}' has no patch tokens")
    return ConfigError(f"config: model.image.kwargs rejected by timm '{cfg.name}': {e}")


def set_fused_attn(module: nn.Module, enable: bool) -> None:
    """Switch timm attention blocks between the fused SDPA kernel and the math path, per module."""
    for m in module.modules():
        if hasattr(m, "fused_attn") and isinstance(m.fused_attn, bool):
            m.fused_attn = enable


class ImageTower(nn.Module):
    """timm trunk (classifier removed) → pooled features (B, width) → projection (B, embed_dim)."""

    def __init__(self, cfg: ImageTowerConfig, embed_dim: int, fused_attn: bool | None = None):
        super().__init__()
        self.cfg = cfg
        self.trunk = _create_trunk(cfg)
        self.width = self.trunk.num_features
        self.proj = build_projection(cfg.proj, self.width, embed_dim, cfg.proj_bias)
        if fused_attn is not None:
            set_fused_attn(self.trunk, fused_attn)

    def forward_features(self, image: torch.Tensor) -> torch.Tensor:
        """Unpooled trunk features: (B, N, width) tokens for ViTs, (B, width, H, W) maps for CNNs."""
        return self.trunk.forward_features(image)

    def forward_pooled(self, image: torch.Tensor) -> torch.Tensor:
        return self.trunk(image)  # num_classes=0 → pooled (B, width)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.proj(self.forward_pooled(image))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        names = getattr(self.trunk, "no_weight_decay", lambda: set())()
        return {f"trunk.{n}" for n in names}

    def layer_groups(self) -> list[list[str]]:
        """Parameter names grouped from input to output by timm's group_matcher (embeddings, blocks, final norm)."""
        from timm.models import group_parameters

        groups = group_parameters(self.trunk, self.trunk.group_matcher(coarse=False))
        ordered = [[f"trunk.{n}" for n in groups[k]] for k in sorted(groups)]
        ordered.append([n for n, _ in self.proj.named_parameters(prefix="proj")])
        return [g for g in ordered if g]

    def lock(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
        """Freeze the trunk except its last ``unlocked_groups`` layer groups; the projection stays trainable (LiT)."""
        groups = self.layer_groups()[:-1]  # the projection is never locked
        n_locked = max(len(groups) - unlocked_groups, 0)
        locked = {name for group in groups[:n_locked] for name in group}
        for name, param in self.named_parameters():
            if name in locked:
                param.requires_grad = False
        if freeze_bn_stats and n_locked:
            from timm.layers import freeze_batch_norm_2d

            for name, child in list(self.trunk.named_children()):
                if all(f"trunk.{name}.{p}" in locked for p, _ in child.named_parameters()):
                    setattr(self.trunk, name, freeze_batch_norm_2d(child))
