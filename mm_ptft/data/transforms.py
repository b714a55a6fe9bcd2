"""Image transforms for training and evaluation (torchvision, PIL input)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torchvision import transforms as T

from mm_ptft.config import ImageTransformConfig

_INTERPOLATION = {
    "bicubic": T.InterpolationMode.BICUBIC,
    "bilinear": T.InterpolationMode.BILINEAR,
    "nearest": T.InterpolationMode.NEAREST,
}


def image_mode(in_chans: int) -> str:
    return "L" if in_chans == 1 else "RGB"


def create_transform(
    cfg: ImageTransformConfig, image_size: int, in_chans: int, mean: list[float], std: list[float], train: bool
) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image → normalised (C, H, W) float tensor.

    Training uses open_clip's recipe (RandomResizedCrop over ``train_scale`` of the area, optional flip); evaluation
    resizes the short side and centre-crops.
    """
    mode = image_mode(in_chans)
    interpolation = _INTERPOLATION[cfg.interpolation]
    steps: list[Callable] = [lambda im: im.convert(mode) if im.mode != mode else im]
    if train:
        steps.append(
            T.RandomResizedCrop(
                image_size, scale=tuple(cfg.train_scale), ratio=tuple(cfg.train_ratio), interpolation=interpolation
            )
        )
        if cfg.hflip > 0:
            steps.append(T.RandomHorizontalFlip(cfg.hflip))
    else:
        steps += [T.Resize(image_size, interpolation=interpolation), T.CenterCrop(image_size)]
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)
