"""Near duplicates without a model: a pixel descriptor that survives re-encoding, resizing and light crops, for
``dedup --pixels``.

Every image becomes a 28 × 28 grayscale thumbnail (PIL, bilinear with antialiasing; held as uint8, 784 bytes per
image). Its descriptor: a 3 × 3 box blur, averaged down to 14 × 14, mean removed, L2-normalised (196 floats) — the
blur and pooling absorb re-encoding noise and the sub-pixel shifts a resize leaves; removing the mean makes it
blind to brightness. A crop then resize is a zoom about some point, which no pooled thumbnail survives, so a pair's
similarity is the best inner product over a grid of zooms of either image (:data:`ZOOMS`, each about the centre
moved by :data:`SHIFTS` thumbnail pixels, plus the identity): the index holds the untransformed descriptors, each
transform's descriptors are searched against it, and a pair keeps its highest similarity from either side.

Measured on Fashion-MNIST (``bench/dedup_recall.py --pixels``, docs/data.md): copies re-encoded, resized up and
back, resized down to 13/14 and cropped by 1–2 px (≈ 4–8 % zoom) score ≥ 0.997 against their original, and 0.3 %
of the 60,000 distinct training images have another above the default threshold :data:`THRESHOLD` (0.998).
Beyond the grid (crops over ~12 %, rotations, flips, colour changes) this descriptor does not match; a model's
embedding (``--model``) is the tool for those.
"""

from __future__ import annotations

import io
from typing import Any

from data_tools.filter import image_of

SIZE = 28  # thumbnail side
POOL = 14  # descriptor side
THRESHOLD = 0.998
ZOOMS = (1.04, 1.077, 1.12)  # a crop of 1–3 px off a 28-px side, resized back
SHIFTS = (-1.0, 0.0, 1.0)  # the zoom's centre, in thumbnail pixels, on each axis
_CHUNK = 4096  # images per descriptor batch: bounds the float copies of the thumbnails


def transforms() -> list[tuple[float, float, float] | None]:
    """The grid a pair's similarity is the best over: None (the identity), then (zoom, dx, dy)."""
    return [None] + [(z, dx, dy) for z in ZOOMS for dx in SHIFTS for dy in SHIFTS]


class PixelDescriptor:
    """``dedup``'s embedder for ``--pixels``: ``decode`` raw samples into thumbnails, ``encode_images`` them into
    the rows ``dedup`` keeps (the uint8 thumbnails; descriptors are made from them per transform)."""

    def decode(self, raw: dict) -> tuple[Any, str | None]:
        """(the 28 × 28 uint8 thumbnail, None), or (None, why not)."""
        import numpy as np
        from PIL import Image, UnidentifiedImageError

        data = image_of(raw)
        if data is None:
            return None, "no image"
        try:
            with Image.open(io.BytesIO(data)) as image:
                thumb = image.convert("L").resize((SIZE, SIZE), Image.Resampling.BILINEAR)
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            return None, f"bad_image: {exc}"
        return np.asarray(thumb, dtype=np.uint8), None

    def encode_images(self, items: list) -> Any:
        """(B, 784) uint8: the thumbnails, one row each."""
        import numpy as np

        return np.stack([item.reshape(-1) for item in items])


def descriptors(thumbs, transform: tuple[float, float, float] | None = None):
    """(N, 196) float32 L2-normalised descriptors of (N, 784) uint8 thumbnails, each under ``transform``."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    out = np.empty((len(thumbs), POOL * POOL), dtype=np.float32)
    for start in range(0, len(thumbs), _CHUNK):
        x = torch.from_numpy(np.ascontiguousarray(thumbs[start : start + _CHUNK])).float().div_(255)
        x = x.view(-1, 1, SIZE, SIZE)
        if transform is not None:
            zoom, dx, dy = transform
            theta = torch.tensor([[1 / zoom, 0, 2 * dx / SIZE], [0, 1 / zoom, 2 * dy / SIZE]], dtype=torch.float32)
            grid = F.affine_grid(theta.expand(len(x), 2, 3), list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        x = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        x = F.adaptive_avg_pool2d(x, POOL).flatten(1)
        x = F.normalize(x - x.mean(1, keepdim=True), dim=1)
        out[start : start + len(x)] = x.numpy()
    return out


def similarity(a, b) -> float:
    """Two thumbnails' similarity as ``dedup --pixels`` scores a pair: the best over the grid, either way round."""
    import numpy as np

    pair = np.stack([a.reshape(-1), b.reshape(-1)])
    base = descriptors(pair)
    best = -1.0
    for t in transforms():
        moved = base if t is None else descriptors(pair, t)
        best = max(best, float(moved[0] @ base[1]), float(moved[1] @ base[0]))
    return best


__all__ = ["POOL", "SIZE", "SHIFTS", "THRESHOLD", "ZOOMS", "PixelDescriptor", "descriptors", "similarity", "transforms"]
