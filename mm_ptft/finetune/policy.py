"""Fine-tuning policies: which part of a pretrained tower trains besides the new head.

linear-probe   the tower is frozen (and kept in eval mode); only the head trains
last-n         the tower's last ``unlocked_groups`` layer groups train (timm groups / transformer layers)
full           everything trains (layer-wise lr decay, ``optim.layer_decay``, keeps early layers close)
"""

from __future__ import annotations

from typing import Literal

from mm_ptft.models.classifier import TowerClassifier

Policy = Literal["linear-probe", "last-n", "full"]
POLICIES: tuple[str, ...] = ("linear-probe", "last-n", "full")


def apply_policy(model: TowerClassifier, policy: Policy, unlocked: int = 0) -> None:
    """Freeze ``model``'s tower as ``policy`` says; the head always trains.

    Raises:
        ValueError: an unknown policy.
    """
    if policy == "linear-probe":
        model.freeze_tower()
    elif policy == "last-n":
        model.lock_tower(unlocked)
    elif policy != "full":
        raise ValueError(f"unknown policy '{policy}' ({', '.join(POLICIES)})")
    if model.head_input == "pooled":
        model.tower.proj.requires_grad_(False)  # the head reads the trunk's pooled features: the projection is unused
