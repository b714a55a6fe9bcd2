"""Fine-tuning policies: which part of a pretrained tower trains besides the new head.

linear-probe   the tower is frozen (and kept in eval mode); only the head trains
last-n         the tower's last ``unlocked_groups`` layer groups train (timm groups / transformer layers)
full           everything trains (layer-wise lr decay, ``optim.layer_decay``, keeps early layers close)
lora           low-rank adapters (peft) on the tower's layers train, the tower's own weights stay frozen
ia3            (IA)³ scales (peft) of some layers train, the tower's own weights stay frozen
bias           the tower's bias terms train (BitFit), its weights stay frozen
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from mm_ptft.config import FinetuneConfig
from mm_ptft.finetune.peft import ADAPTER_POLICIES, add_adapters, is_adapter_parameter, train_biases
from mm_ptft.models.classifier import TowerClassifier

Policy = Literal["linear-probe", "last-n", "full", "lora", "ia3", "bias"]
POLICIES: tuple[str, ...] = ("linear-probe", "last-n", "full", "lora", "ia3", "bias")


def apply_policy(model: TowerClassifier, ft: FinetuneConfig) -> None:
    """Freeze ``model``'s tower (or add adapters to it) as ``ft.policy`` says; the head always trains.

    Raises:
        ValueError: an unknown policy.
        ConfigError: adapter settings that do not fit this tower (see :mod:`mm_ptft.finetune.peft`).
    """
    if ft.policy == "linear-probe":
        model.freeze_tower()
    elif ft.policy == "last-n":
        model.lock_tower(ft.unlocked_groups)
    elif ft.policy in ADAPTER_POLICIES:
        add_adapters(model, ft)
    elif ft.policy == "bias":
        train_biases(model)
    elif ft.policy != "full":
        raise ValueError(f"unknown policy '{ft.policy}' ({', '.join(POLICIES)})")
    if model.head_input == "pooled":
        model.tower.proj.requires_grad_(False)  # the head reads the trunk's pooled features: the projection is unused


def parameter_counts(model: nn.Module) -> dict[str, int | float]:
    """Trainable and total parameters of a model (``params/trainable``, ``params/total``, ``params/trainable_share``);
    for a tower classifier also the tower's (``params/tower``: the tower's own parameters, adapters not counted;
    ``params/tower_trainable``: what trains inside it, adapters included; ``params/tower_trainable_share``)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    counts: dict[str, int | float] = {
        "params/trainable": trainable,
        "params/total": total,
        "params/trainable_share": trainable / max(total, 1),
    }
    if isinstance(model, TowerClassifier):
        named = list(model.tower.named_parameters())
        own = sum(p.numel() for n, p in named if not is_adapter_parameter(n))
        tower_trainable = sum(p.numel() for _, p in named if p.requires_grad)
        counts.update(
            {
                "params/tower": own,
                "params/tower_trainable": tower_trainable,
                "params/tower_trainable_share": tower_trainable / max(own, 1),
            }
        )
    return counts
