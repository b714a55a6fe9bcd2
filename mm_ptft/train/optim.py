"""AdamW parameter groups (no decay on norms/biases/scale, per-tower lr, layer-wise decay) and the lr schedule."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from mm_ptft.config import OptimConfig


def _layer_ids(model: nn.Module) -> dict[str, tuple[int, int]]:
    """name → (layer index, number of layers) within its tower, from the towers' ``layer_groups()``."""
    ids: dict[str, tuple[int, int]] = {}
    for tower_name in ("image", "text"):
        tower = getattr(model, tower_name, None)
        if tower is None or not hasattr(tower, "layer_groups"):
            continue
        groups = tower.layer_groups()
        for i, names in enumerate(groups):
            for n in names:
                ids[f"{tower_name}.{n}"] = (i, len(groups))
    return ids


def param_groups(model: nn.Module, cfg: OptimConfig, prefix: str = "") -> list[dict]:
    """Trainable parameters of ``model`` grouped by (tower, decay or not, layer) with their lr and weight decay.

    Each group carries ``name`` (for logging), ``lr_scale`` (multiplies the scheduled lr) and ``param_names``
    (used to map optimizer state back to names, e.g. for stage-0 fp32 consolidation).
    """
    no_decay_names = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    layer_ids = _layer_ids(model) if cfg.layer_decay is not None else {}
    groups: dict[tuple, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        tower = name.split(".", 1)[0] if name.split(".", 1)[0] in ("image", "text") else "other"
        decay = param.ndim >= 2 and name not in no_decay_names and not name.endswith(".bias")
        scale = {"image": cfg.image_lr_scale, "text": cfg.text_lr_scale}.get(tower, 1.0)
        layer = None
        if name in layer_ids:
            layer, n_layers = layer_ids[name]
            scale *= cfg.layer_decay ** (n_layers - 1 - layer)
        key = (tower, decay, layer)
        if key not in groups:
            label = f"{tower}/{'decay' if decay else 'no_decay'}" + (f"/layer{layer}" if layer is not None else "")
            groups[key] = {
                "params": [],
                "param_names": [],
                "name": label,
                "weight_decay": cfg.weight_decay if decay else 0.0,
                "lr": cfg.lr * scale,
                "lr_scale": scale,
            }
        groups[key]["params"].append(param)
        groups[key]["param_names"].append(prefix + name)
    return list(groups.values())


def create_optimizer(model: nn.Module, cfg: OptimConfig, prefix: str = "") -> torch.optim.Optimizer:
    groups = param_groups(model, cfg, prefix)
    if not groups:
        raise ValueError("optim: the model has no trainable parameters (is every tower locked?)")
    if cfg.name == "sgd":  # weight decay coupled, as torch.optim.SGD (and timm's 'sgd') apply it
        return torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
        )
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


def lr_lambda(cfg: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of each group's base lr at optimizer step ``step``: linear warm-up, then cosine/linear/constant."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = min((step - warmup) / max(total_steps - warmup, 1), 1.0)
        if cfg.schedule == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            shape = 1.0 - progress
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape

    return fn


def create_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
