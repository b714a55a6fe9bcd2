"""The two-tower model: ``encode_image``, ``encode_text``, a learnable clamped temperature and optional bias."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mm_ptft.config import ModelConfig
from mm_ptft.models.image_tower import ImageTower
from mm_ptft.models.text_tower import TextTower


def use_fused_attn(cfg: ModelConfig) -> bool:
    """``model.fused_attn``, or when unset: fused (SDPA) attention on CUDA, math attention on CPU, where the fused
    kernel's backward is slower (docs/performance.md)."""
    return cfg.fused_attn if cfg.fused_attn is not None else torch.cuda.is_available()


class DualEncoder(nn.Module):
    """CLIP-style dual encoder over a timm image tower and a transformers text tower.

    ``forward`` returns a dict so tasks and losses never depend on argument order:
    ``image_features`` (B, D), ``text_features`` (B, D) (L2-normalised), ``logit_scale`` (scalar, exp'd and
    clamped), and ``logit_bias`` when the model has one.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.image = ImageTower(cfg.image, cfg.embed_dim, fused_attn=use_fused_attn(cfg))
        self.text = TextTower(cfg.text, cfg.embed_dim)
        # shape (1,), not (): DeepSpeed broadcasts parameters as byte views, which a 0-dim bf16 tensor cannot give
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(cfg.logit_scale_init)))
        bias = cfg.logit_bias_init
        self.logit_bias = nn.Parameter(torch.full((1,), bias)) if bias is not None else None
        self.logit_scale_max = cfg.logit_scale_max

    @property
    def dtype(self) -> torch.dtype:
        return self.logit_scale.dtype

    def encode_image(self, image: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        features = self.image(image.to(self.dtype))
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, normalize: bool = True
    ) -> torch.Tensor:
        features = self.text(input_ids, attention_mask)
        return F.normalize(features, dim=-1) if normalize else features

    def get_logit_scale(self) -> torch.Tensor:
        # clamped in the forward pass (not in-place after the step) so it works on ZeRO-partitioned parameters
        return self.logit_scale.float().exp().clamp(max=self.logit_scale_max).squeeze(0)

    def forward(
        self,
        image: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pooled: dict[str, torch.Tensor] | None = None,
        return_pooled: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Features of the towers given inputs. ``pooled`` holds a tower's trunk output computed before
        (``{"image": …}``: a frozen trunk, forwarded once in cached accumulation): only its projection runs.
        ``return_pooled`` adds the trunk outputs (``image_pooled``, ``text_pooled``) to the result."""
        pooled = pooled or {}
        out = {"logit_scale": self.get_logit_scale()}
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias.float().squeeze(0)
        inputs = {
            "image": (image.to(self.dtype),) if image is not None else None,
            "text": (input_ids, attention_mask) if input_ids is not None else None,
        }
        for name, args in inputs.items():
            tower, trunk = getattr(self, name), pooled.get(name)
            if trunk is None and args is None:
                continue
            if trunk is None:
                trunk = tower.forward_pooled(*args)
                if return_pooled:
                    out[f"{name}_pooled"] = trunk
            out[f"{name}_features"] = F.normalize(tower.proj(trunk), dim=-1)
        return out

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.image.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        """Names excluded from weight decay beyond the 1-d rule (norms, biases): tokens, embeddings' positions."""
        names = {f"image.{n}" for n in self.image.no_weight_decay()}
        names |= {f"text.{n}" for n in self.text.no_weight_decay()}
        return names | {"logit_scale", "logit_bias"}

    def apply_locks(self) -> None:
        """Freeze towers as the config asks (LiT: lock a tower, or all but its last N blocks)."""
        if self.cfg.image.lock:
            self.image.lock(self.cfg.image.lock_unlocked_groups, self.cfg.image.lock_norm_stats)
        if self.cfg.text.lock:
            self.text.lock(self.cfg.text.lock_unlocked_layers, self.cfg.text.lock_embeddings)


def create_model(cfg: ModelConfig) -> DualEncoder:
    """Build the dual encoder (random init, or local pretrained towers as the config names) with locks applied."""
    model = DualEncoder(cfg)
    model.apply_locks()
    return model
