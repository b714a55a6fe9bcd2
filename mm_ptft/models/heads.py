"""Projection heads shared by both towers."""

from __future__ import annotations

from torch import nn


def build_projection(kind: str, width: int, embed_dim: int, bias: bool = False) -> nn.Module:
    """Map pooled tower features (B, width) to the joint embedding (B, embed_dim).

    'linear' is CLIP's choice; 'mlp' is open_clip's timm-tower option (hidden 2 × embed_dim, GELU);
    'none' requires width == embed_dim.
    """
    if kind == "linear":
        return nn.Linear(width, embed_dim, bias=bias)
    if kind == "mlp":
        hidden = 2 * embed_dim
        return nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, embed_dim, bias=bias))
    if kind == "none":
        if width != embed_dim:
            raise ValueError(f"proj='none' needs tower width {width} == model.embed_dim {embed_dim}")
        return nn.Identity()
    raise ValueError(f"unknown projection '{kind}' (linear, mlp, none)")
