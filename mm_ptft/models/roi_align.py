"""RoIAlign as one weighted row gather (``embedding_bag``): torchvision's ``roi_align`` numbers, a fast CPU backward.

torchvision's CPU ``roi_align`` backward walks every (RoI, channel, bin, sample) scalar on its own; with 16 images ×
64 RoIs on a 64-channel FPN it took ~27 % of a Faster R-CNN step here (170 ms of 600 ms, 1 thread). Written as a
gather instead — every sample point is a weighted sum of 4 feature-map rows of C channels, every bin the mean of its
``sampling_ratio²`` points — the forward is one ``embedding_bag`` over the channels-last maps of all pyramid levels,
and its backward one dense scatter-add of C-wide rows, which vectorises (measured: ~10× faster backward).

Semantics follow ``torchvision.ops.roi_align(..., aligned=False)`` with a fixed ``sampling_ratio > 0`` (the form
:class:`~torchvision.ops.MultiScaleRoIAlign` uses), including its clamping at the map border; a test checks the
values and gradients against torchvision.
"""

from __future__ import annotations

import torch
from torch import nn


def _axis(start: torch.Tensor, size: torch.Tensor, bins: int, samples: int, extent: torch.Tensor):
    """Per-RoI sample coordinates along one axis → (low index, high index, low weight, high weight), each (K, S).

    ``start``/``size``: (K,) RoI start and length in map cells; ``extent``: (K,) map length along this axis.
    Mirrors torchvision's ``bilinear_interpolate``: points beyond [-1, extent] contribute 0, others are clamped.
    """
    steps = torch.arange(bins * samples, device=start.device, dtype=start.dtype)
    # sample s of bin p sits at start + p·bin + (s + 0.5)·bin/samples = start + (p·samples + s + 0.5)·bin/samples
    pos = start[:, None] + (steps + 0.5)[None] * (size / (bins * samples))[:, None]  # (K, S)
    extent = extent[:, None].to(pos.dtype)
    valid = (pos >= -1.0) & (pos <= extent)
    pos = pos.clamp(min=0.0)
    low = pos.floor()
    at_edge = low >= extent - 1
    low = torch.where(at_edge, extent - 1, low)
    pos = torch.where(at_edge, low, pos)
    high = torch.where(at_edge, low, low + 1)
    frac = pos - low
    w_low, w_high = (1.0 - frac) * valid, frac * valid
    return low.long(), high.long(), w_low, w_high


def roi_align_levels(
    features: list[torch.Tensor],
    rois: torch.Tensor,
    levels: torch.Tensor,
    scales: list[float],
    output_size: int,
    sampling_ratio: int,
) -> torch.Tensor:
    """RoIAlign of each RoI on its own pyramid level.

    Args:
        features: per level (B, C, H_l, W_l) maps (same B and C).
        rois: (K, 5) ``[batch index, x1, y1, x2, y2]`` in input-image pixels.
        levels: (K,) level index of each RoI.
        scales: per level map cells per input pixel (1 / stride).
        output_size: bins per side (7 for Faster R-CNN's box head).
        sampling_ratio: sample points per bin side (> 0).

    Returns:
        (K, C, output_size, output_size) pooled features, as ``torchvision.ops.roi_align(aligned=False)``.
    """
    if sampling_ratio <= 0:
        raise ValueError("roi_align_levels needs a fixed sampling_ratio > 0")
    channels = features[0].shape[1]
    k, p, s = rois.shape[0], output_size, sampling_ratio
    if k == 0:
        return features[0].new_zeros(0, channels, p, p)
    # one table of rows: every level's map channels-last, (sum_l B·H_l·W_l, C)
    table = torch.cat([f.permute(0, 2, 3, 1).reshape(-1, channels) for f in features])
    sizes = torch.tensor([[f.shape[2], f.shape[3]] for f in features], device=rois.device)
    offsets = torch.tensor([0] + [f.shape[0] * f.shape[2] * f.shape[3] for f in features], device=rois.device)
    offsets = offsets.cumsum(0)[:-1]
    height, width = sizes[levels, 0], sizes[levels, 1]  # (K,)
    scale = torch.tensor(scales, dtype=rois.dtype, device=rois.device)[levels]
    with torch.no_grad():  # torchvision's RoIAlign has no gradient for the boxes either
        x1, y1, x2, y2 = (rois[:, i] * scale for i in range(1, 5))
        y_low, y_high, wy_low, wy_high = _axis(y1, (y2 - y1).clamp(min=1.0), p, s, height)
        x_low, x_high, wx_low, wx_high = _axis(x1, (x2 - x1).clamp(min=1.0), p, s, width)
        base = offsets[levels] + rois[:, 0].long() * height * width  # (K,) first row of the RoI's image
        # (K, S, 1) rows and weights along y, (K, 1, S) along x → 4 corners of every (y, x) sample point
        row_y = [(base[:, None] + y * width[:, None])[:, :, None] for y in (y_low, y_high)]
        col_x = [x[:, None, :] for x in (x_low, x_high)]
        wy = [w[:, :, None] for w in (wy_low, wy_high)]
        wx = [w[:, None, :] for w in (wx_low, wx_high)]
        index = torch.stack([ry + cx for ry in row_y for cx in col_x], dim=-1)  # (K, pS, pS, 4)
        weight = torch.stack([a * b for a in wy for b in wx], dim=-1) / (s * s)
        # group the s × s points of each bin (and their 4 corners) into one bag of 4·s² rows: (K·p·p, 4·s²)
        index = index.view(k, p, s, p, s, 4).permute(0, 1, 3, 2, 4, 5).reshape(k * p * p, 4 * s * s)
        weight = weight.view(k, p, s, p, s, 4).permute(0, 1, 3, 2, 4, 5).reshape(k * p * p, 4 * s * s)
    pooled = nn.functional.embedding_bag(index, table, per_sample_weights=weight.to(table.dtype), mode="sum")
    return pooled.view(k, p, p, channels).permute(0, 3, 1, 2)  # (K, C, p, p)


def create_multiscale_roi_align(
    featmap_names: list[str], output_size: int, sampling_ratio: int, canonical_scale: int = 224
) -> nn.Module:
    """torchvision's ``MultiScaleRoIAlign`` (same level assignment, same numbers) pooling through
    :func:`roi_align_levels`; with ``sampling_ratio <= 0`` (adaptive) torchvision's own kernel is kept.
    A box of side ``canonical_scale`` pools from the level of stride 16 (FPN paper's rule; torchvision's 224)."""
    from torchvision.ops import MultiScaleRoIAlign

    class GatherMultiScaleRoIAlign(MultiScaleRoIAlign):
        def forward(self, x, boxes, image_shapes):
            features = [x[name] for name in self.featmap_names]
            if self.scales is None or self.map_levels is None:
                from torchvision.ops.poolers import _setup_scales

                self.scales, self.map_levels = _setup_scales(
                    features, image_shapes, self.canonical_scale, self.canonical_level
                )
            rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)])
            if len(features) == 1:
                levels = torch.zeros(rois.shape[0], dtype=torch.long, device=rois.device)
            else:
                levels = self.map_levels(boxes).long()
            return roi_align_levels(features, rois, levels, self.scales, self.output_size[0], self.sampling_ratio)

    cls = MultiScaleRoIAlign if sampling_ratio <= 0 else GatherMultiScaleRoIAlign
    return cls(featmap_names, output_size=output_size, sampling_ratio=sampling_ratio, canonical_scale=canonical_scale)
