"""Image transforms for training and evaluation (torchvision, PIL input)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms.functional import pil_to_tensor

from mm_ptft.config import ImageTransformConfig

_INTERPOLATION = {
    "bicubic": T.InterpolationMode.BICUBIC,
    "bilinear": T.InterpolationMode.BILINEAR,
    "nearest": T.InterpolationMode.NEAREST,
}


def image_mode(in_chans: int) -> str:
    return "L" if in_chans == 1 else "RGB"


class _Mode:
    """PIL image → ``mode`` ('L' or 'RGB'); a grayscale image bound for RGB stays 'L' (:class:`ToNormalizedTensor`
    widens it at the end, so crops, resizes and flips touch one channel instead of three identical ones)."""

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, im: Image.Image) -> Image.Image:
        if im.mode == self.mode or (im.mode == "L" and self.mode == "RGB"):
            return im
        return im.convert(self.mode)


class ToNormalizedTensor:
    """PIL image (L or RGB) → ``(channels, H, W)`` float tensor ``(x / 255 - mean) / std``.

    The same arithmetic as ``T.ToTensor()`` then ``T.Normalize(mean, std)`` (equal to the last bit), without their
    per-call overhead: on a 48 px image they took ~180 µs of a data worker, this ~20 µs. A one-channel image becomes
    ``channels`` identical channels, as ``convert('RGB')`` would have made them.
    """

    def __init__(self, mean: list[float], std: list[float], channels: int):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.channels = channels

    def __call__(self, im: Image.Image) -> torch.Tensor:
        x = pil_to_tensor(im).float().div(255)  # (C, H, W) uint8 → [0, 1], as T.ToTensor computes it
        if x.shape[0] != self.channels:
            x = x.expand(self.channels, -1, -1)
        return x.sub(self.mean).div(self.std)


def create_transform(
    cfg: ImageTransformConfig, image_size: int, in_chans: int, mean: list[float], std: list[float], train: bool
) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image → normalised (C, H, W) float tensor.

    Training uses open_clip's recipe (RandomResizedCrop over ``train_scale`` of the area, optional flip) and, with
    ``re_prob``, random erasing (Zhong et al. 2017: one rectangle of the normalised image → N(0, 1) noise, as timm's
    ``--reprob``); evaluation resizes the short side and centre-crops. Outputs equal torchvision's
    ``convert → … → ToTensor → Normalize`` exactly (tests/test_data.py), computed more cheaply.
    """
    interpolation = _INTERPOLATION[cfg.interpolation]
    steps: list[Callable] = [_Mode(image_mode(in_chans))]
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
    steps.append(ToNormalizedTensor(mean, std, in_chans))
    if train and cfg.re_prob > 0:
        steps.append(T.RandomErasing(cfg.re_prob, value="random"))
    return T.Compose(steps)
