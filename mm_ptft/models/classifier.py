"""Classifiers over one tower: a tower (attribute ``image`` or ``text``, so the optimizer's layer-wise lr decay finds
its ``layer_groups()``) and a linear head. What a fine-tuning policy freezes is decided in :mod:`mm_ptft.finetune`;
the classifier only knows how to lock its tower.

Single-device code.
"""

from __future__ import annotations

import abc
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

HeadInput = Literal["pooled", "embedding"]


class TowerClassifier(nn.Module, abc.ABC):
    """``tower`` → features → ``head`` (B, num_classes).

    ``head_input='pooled'`` feeds the trunk's pooled features (B, width) to the head and leaves the tower's projection
    unused (frozen, kept so the weights stay those of the pretraining checkpoint); ``'embedding'`` feeds the
    L2-normalised projected embedding (B, embed_dim) — the space the zero-shot classifier lives in.
    """

    tower_name: str = "tower"

    def __init__(self, tower: nn.Module, embed_dim: int, num_classes: int, head_input: HeadInput):
        super().__init__()
        self.add_module(self.tower_name, tower)
        self.head_input = head_input
        self.num_classes = num_classes
        self.head = nn.Linear(embed_dim if head_input == "embedding" else tower.width, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)  # timm's classifier-head init
        nn.init.zeros_(self.head.bias)
        if head_input == "pooled":
            tower.proj.requires_grad_(False)
        self.frozen_tower = False

    @property
    def tower(self) -> nn.Module:
        return getattr(self, self.tower_name)

    @property
    def dtype(self) -> torch.dtype:
        return self.head.weight.dtype

    def _project(self, pooled: torch.Tensor) -> torch.Tensor:
        if self.head_input == "pooled":
            return pooled
        return F.normalize(self.tower.proj(pooled), dim=-1)

    @torch.no_grad()
    def set_zeroshot_head(self, class_embeddings: torch.Tensor, logit_scale: float) -> None:
        """Head = the zero-shot classifier: ``logit_scale`` × class embeddings (D, C), bias 0 (WiSE-FT's head)."""
        if self.head_input != "embedding":
            raise ValueError("a zero-shot head needs head_input='embedding'")
        self.head.weight.copy_(logit_scale * class_embeddings.T.to(self.head.weight))
        self.head.bias.zero_()

    def freeze_tower(self) -> None:
        """Freeze the whole tower; it stays in eval mode (no dropout noise on features nothing can adapt to)."""
        self.lock_tower(0)
        self.tower.requires_grad_(False)
        self.frozen_tower = True
        self.train(self.training)

    @abc.abstractmethod
    def lock_tower(self, unlocked: int) -> None:
        """Freeze the tower except its last ``unlocked`` layer groups (the head always trains)."""

    def train(self, mode: bool = True) -> TowerClassifier:
        super().train(mode)
        if self.frozen_tower:
            self.tower.eval()
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.tower.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        return {f"{self.tower_name}.{n}" for n in self.tower.no_weight_decay()}


class ImageClassifier(TowerClassifier):
    """An :class:`ImageTower` + linear head: ``forward(image (B, C, H, W)) -> logits (B, num_classes)``."""

    tower_name = "image"

    def __init__(self, tower: nn.Module, embed_dim: int, num_classes: int, head_input: HeadInput):
        super().__init__(tower, embed_dim, num_classes, head_input)
        # CNN trunks take NHWC input: oneDNN's CPU convolutions ran ~20 % faster on it here (bf16, batch 128, 48 px);
        # a ViT's patch embedding gains nothing from it
        self.channels_last = not hasattr(tower.trunk, "patch_embed")

    def features(self, image: torch.Tensor) -> torch.Tensor:
        image = image.to(self.dtype)
        if self.channels_last and image.dim() == 4:
            image = image.contiguous(memory_format=torch.channels_last)
        return self._project(self.image.forward_pooled(image))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(image))

    def lock_tower(self, unlocked: int) -> None:
        # BatchNorm statistics of locked CNN stages stay frozen too (no-op for ViTs)
        self.image.lock(unlocked, freeze_bn_stats=True)


class TextClassifier(TowerClassifier):
    """A :class:`TextTower` + linear head: ``forward(input_ids (B, L), attention_mask (B, L)) -> logits``."""

    tower_name = "text"

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._project(self.text.forward_pooled(input_ids, attention_mask))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.features(input_ids, attention_mask))

    def lock_tower(self, unlocked: int) -> None:
        self.text.lock(unlocked, lock_embeddings=True)
