"""Classifiers over one tower: a tower (attribute ``image`` or ``text``, so the optimizer's layer-wise lr decay finds
its ``layer_groups()``) and a linear head, with the freeze policies and the loading of pretrained tower weights.

Single-device code, like mm_ptft/models.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mm_ptft import checkpoint as ckpt
from mm_ptft.models import ImageTower, TextTower

Policy = Literal["linear-probe", "last-n", "full"]
HeadInput = Literal["pooled", "embedding"]


class TowerClassifier(nn.Module):
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

    def apply_policy(self, policy: Policy, unlocked: int = 0) -> None:
        """Freeze the tower as the policy says: ``linear-probe`` all of it, ``last-n`` all but its last ``unlocked``
        layer groups, ``full`` nothing. The head always trains."""
        if policy == "linear-probe":
            self._lock(0)
            self.tower.requires_grad_(False)
            self.frozen_tower = True  # kept in eval mode: no dropout noise on features nothing can adapt to
            self.train(self.training)
        elif policy == "last-n":
            self._lock(unlocked)
        elif policy != "full":
            raise ValueError(f"unknown policy '{policy}' (linear-probe, last-n, full)")
        if self.head_input == "pooled":
            self.tower.proj.requires_grad_(False)

    def _lock(self, unlocked: int) -> None:
        raise NotImplementedError

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

    def _lock(self, unlocked: int) -> None:
        # BatchNorm statistics of locked CNN stages stay frozen too (no-op for ViTs)
        self.image.lock(unlocked, freeze_bn_stats=True)


class TextClassifier(TowerClassifier):
    """A :class:`TextTower` + linear head: ``forward(input_ids (B, L), attention_mask (B, L)) -> logits``."""

    tower_name = "text"

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._project(self.text.forward_pooled(input_ids, attention_mask))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.features(input_ids, attention_mask))

    def _lock(self, unlocked: int) -> None:
        self.text.lock(unlocked, lock_embeddings=True)


def tower_state(state: dict[str, torch.Tensor], prefix: str, source: str) -> dict[str, torch.Tensor]:
    """The ``prefix``-ed weights of a model state (``image.`` / ``text.``), names relative to the tower."""
    sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not sub:
        raise ckpt.CheckpointError(
            f"checkpoint: {source} holds no '{prefix}*' weights (keys start with: "
            f"{', '.join(sorted({k.split('.')[0] for k in state})[:5])})"
        )
    return sub


def load_tower(tower: ImageTower | TextTower, source: str, prefix: str) -> None:
    """Load a tower from a pretraining or fine-tuning checkpoint (any ZeRO stage, consolidated to fp32).

    Raises:
        CheckpointError: the source is missing, holds no ``prefix`` weights, or weights of another shape.
    """
    state = tower_state(ckpt.load_weights(source), prefix, source)
    for name, value in tower.state_dict().items():
        # CNN stages a last-n / linear-probe run locked became FrozenBatchNorm2d, which keeps no batch counter;
        # the counter only matters for BatchNorm with momentum=None, so the fresh tower's own value stands in
        if name.endswith(".num_batches_tracked") and name not in state:
            state[name] = value
    ckpt.load_model_weights(tower, state, what=f"{source} ('{prefix}*' weights)")
