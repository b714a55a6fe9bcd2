"""Image transforms for training and evaluation (PIL input), with randomness from a generator the caller passes.

Every random choice (crop box, flip, erased rectangle and its noise) is drawn from the ``torch.Generator`` given to
the call, never from the global RNG: the training stream seeds one per sample from the sample's stream position,
so augmentation is identical after a resume, and the training process's own RNG (dropout, drop-path) is untouched
when samples are decoded in it (``data.workers: 0``). Draws follow torchvision's algorithms in the same order, so a
generator seeded like the global RNG gives torchvision's exact result (tests/data/test_transforms.py).

A training transform also tells the decoder what it needs before the image is decoded (:meth:`ImageTransform.plan`):
the crop box, drawn on the full-size dimensions from the header with the same draws in the same order, and the output
size. ``decode_image`` then decodes a JPEG at the smallest DCT scale its decoder offers that still gives the box
≥ ``size`` pixels and hands the pixels back to :meth:`ImageTransform.finish` (docs/data.md, "Decoding at 224 px").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F
from torchvision.transforms.functional import pil_to_tensor

from mm_ptft.config import ImageTransformConfig

_INTERPOLATION = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST,
}

Step = Callable[[object, torch.Generator | None], object]


def image_mode(in_chans: int) -> str:
    return "L" if in_chans == 1 else "RGB"


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return torch.empty(1).uniform_(low, high, generator=generator).item()


def _randint(high: int, generator: torch.Generator) -> int:
    return int(torch.randint(0, high, size=(1,), generator=generator).item())


class _Mode:
    """PIL image → ``mode`` ('L' or 'RGB'); a grayscale image bound for RGB stays 'L' (:class:`ToNormalizedTensor`
    widens it at the end, so crops, resizes and flips touch one channel instead of three identical ones)."""

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, im: Image.Image, generator: torch.Generator | None = None) -> Image.Image:
        if im.mode == self.mode or (im.mode == "L" and self.mode == "RGB"):
            return im
        return im.convert(self.mode)


class RandomResizedCrop:
    """A crop of a random area fraction (``scale``) and aspect ratio (``ratio``, log-uniform), resized to ``size``:
    torchvision's ``RandomResizedCrop`` (10 tries, then a centre crop clamped to the ratio range)."""

    def __init__(self, size: int, scale: Sequence[float], ratio: Sequence[float], interpolation: InterpolationMode):
        self.size, self.scale, self.ratio, self.interpolation = size, tuple(scale), tuple(ratio), interpolation
        self.log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))

    def params(self, width: int, height: int, generator: torch.Generator) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the crop."""
        area = width * height
        for _ in range(10):
            target = area * _uniform(self.scale[0], self.scale[1], generator)
            aspect = math.exp(_uniform(self.log_ratio[0], self.log_ratio[1], generator))
            w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = _randint(height - h + 1, generator)
                return top, _randint(width - w + 1, generator), h, w
        shape = width / height  # no try fitted: the largest centre crop inside the ratio range
        if shape < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif shape > max(self.ratio):
            w, h = int(round(height * max(self.ratio))), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, im: Image.Image, generator: torch.Generator | None) -> Image.Image:
        top, left, h, w = self.params(im.width, im.height, _generator(generator))
        return F.resized_crop(im, top, left, h, w, [self.size, self.size], self.interpolation, antialias=True)


@dataclass(frozen=True)
class CropPlan:
    """A training crop drawn before decoding: ``box`` (left, top, right, bottom) in full-size pixels, resized to
    ``size`` × ``size``; ``mode`` is the transform's target mode ('L' or 'RGB'), so a decoder can decode straight to it.
    """

    box: tuple[int, int, int, int]
    size: int
    mode: str
    interpolation: InterpolationMode

    def scaled_box(self, scale: float) -> tuple[int, int, int, int]:
        """The box in the pixels of an image decoded at ``scale`` (decoded / full size), edges rounded to nearest."""
        return tuple(int(round(v * scale)) for v in self.box)  # type: ignore[return-value]

    def fits(self, scale: float) -> bool:
        """Whether the box, decoded at ``scale``, still has ≥ ``size`` pixels each way (never an upsampled crop)."""
        left, top, right, bottom = self.scaled_box(scale)
        width, height = self.box[2] - self.box[0], self.box[3] - self.box[1]
        return right - left >= min(self.size, width) and bottom - top >= min(self.size, height)


def resize_box(pixels: torch.Tensor, box: tuple[int, int, int, int], size: int, interpolation: InterpolationMode):
    """``(C, H, W)`` uint8 pixels (any strides: an HWC array's permuted view stays channels-last) → the ``box`` resized
    to ``(C, size, size)`` uint8, antialiased like PIL's resampling.

    torch's uint8 antialiased kernel (AVX2, channels-last) ran ~4× faster than Pillow's ``resize`` here (0.6 vs
    2.2 ms from 260 px to 224 px), which is most of what the fast path saves besides decoding fewer pixels.
    """
    left, top, right, bottom = box
    crop = pixels[None, :, top:bottom, left:right]  # (1, C, h, w) view
    mode = {InterpolationMode.BICUBIC: "bicubic", InterpolationMode.BILINEAR: "bilinear"}.get(interpolation)
    if mode is None:  # nearest: no antialiasing
        out = torch.nn.functional.interpolate(crop, size=(size, size), mode="nearest-exact")
    else:
        out = torch.nn.functional.interpolate(crop, size=(size, size), mode=mode, antialias=True)
    return out[0].contiguous()  # (C, size, size), standard strides


class RandomHorizontalFlip:
    def __init__(self, p: float):
        self.p = p

    def __call__(self, im: Image.Image, generator: torch.Generator | None) -> Image.Image:
        return F.hflip(im) if torch.rand(1, generator=_generator(generator)).item() < self.p else im


class RandomErasing:
    """With probability ``p``, one rectangle of 2–33 % of the area (aspect 0.3–3.3) of a normalised (C, H, W) image
    becomes N(0, 1) noise (Zhong et al. 2017; torchvision's ``RandomErasing(value='random')``, timm's ``--reprob``)."""

    def __init__(self, p: float, scale: tuple[float, float] = (0.02, 0.33), ratio: tuple[float, float] = (0.3, 3.3)):
        self.p, self.scale = p, scale
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        generator = _generator(generator)
        if not torch.rand(1, generator=generator).item() < self.p:
            return x
        channels, height, width = x.shape[-3:]
        for _ in range(10):
            target = height * width * _uniform(self.scale[0], self.scale[1], generator)
            aspect = math.exp(_uniform(self.log_ratio[0], self.log_ratio[1], generator))
            h, w = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if h < height and w < width:
                noise = torch.empty(channels, h, w).normal_(generator=generator)
                top, left = _randint(height - h + 1, generator), _randint(width - w + 1, generator)
                x = x.clone()
                x[..., top : top + h, left : left + w] = noise
                return x
        return x


class ResizeCenterCrop:
    """The evaluation view: the short side resized to ``size``, then the centre ``size`` × ``size`` crop."""

    def __init__(self, size: int, interpolation: InterpolationMode):
        self.size, self.interpolation = size, interpolation

    def __call__(self, im: Image.Image, generator: torch.Generator | None = None) -> Image.Image:
        return F.center_crop(F.resize(im, self.size, self.interpolation, antialias=True), self.size)


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

    def __call__(self, im: Image.Image | torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = im if torch.is_tensor(im) else pil_to_tensor(im)  # (C, H, W) uint8 (a tensor from the fast decode path)
        x = x.to(torch.float32, copy=True).div_(255)  # → [0, 1] as T.ToTensor computes it; in place: same values
        if x.shape[0] != self.channels:
            x = x.expand(self.channels, -1, -1)
        return x.sub(self.mean).div_(self.std)


def _generator(generator: torch.Generator | None) -> torch.Generator:
    # called without one (a user's own pipeline): fresh OS entropy, still never the global RNG
    if generator is None:
        generator = torch.Generator()
        generator.seed()
    return generator


class ImageTransform:
    """``transform(image, generator=None)``: the steps in order, each random step drawing from ``generator``.

    With ``fast_decode``, a transform that starts with a random resized crop (after mode conversion) also offers
    :meth:`plan` and :meth:`finish`, so that ``decode_image`` can decode a JPEG at reduced size: ``plan`` draws the crop
    from the full-size dimensions, ``finish`` runs the rest on the pixels. Both together make the same draws in the same
    order as one call, so the crop (and flip, erasing) is the one the full decode would have chosen.
    """

    def __init__(self, steps: list[Step], fast_decode: bool = False):
        self.steps = steps
        self.fast_decode = fast_decode
        self._crop_at = next((i for i, s in enumerate(steps) if not isinstance(s, _Mode)), len(steps))
        if not (fast_decode and self._crop_at < len(steps) and isinstance(steps[self._crop_at], RandomResizedCrop)):
            self._crop_at = None

    def __call__(self, image, generator: torch.Generator | None = None):
        for step in self.steps:
            image = step(image, generator)
        return image

    def bind(self, generator: torch.Generator | None) -> Callable[[Image.Image], torch.Tensor]:
        """This transform with one sample's generator, as ``decode_image`` takes it: a :class:`BoundTransform` (it can
        plan its crop before decoding) when there is a crop to plan, else ``image → transform(image, generator)``."""
        if self._crop_at is None:
            return lambda image: self(image, generator)
        return BoundTransform(self, _generator(generator))

    def plan(self, width: int, height: int, generator: torch.Generator) -> CropPlan | None:
        """The crop for a ``width`` × ``height`` image, drawn before it is decoded; None if this transform has no
        random resized crop to plan (evaluation view, ``fast_decode`` off)."""
        if self._crop_at is None:
            return None
        crop: RandomResizedCrop = self.steps[self._crop_at]  # type: ignore[assignment]
        top, left, h, w = crop.params(width, height, generator)
        mode = next((s.mode for s in self.steps[: self._crop_at] if isinstance(s, _Mode)), "RGB")
        return CropPlan((left, top, left + w, top + h), crop.size, mode, crop.interpolation)

    def finish(
        self, image: Image.Image | torch.Tensor, plan: CropPlan, generator: torch.Generator, scale: float = 1.0
    ) -> torch.Tensor:
        """The rest of the transform after :meth:`plan`: ``image`` is the full-size PIL image (then the output equals
        one call's, to the bit) or ``(C, H, W)`` uint8 pixels decoded at ``scale`` in the target mode (C = 1 or 3)."""
        if torch.is_tensor(image):
            image = resize_box(image, plan.scaled_box(scale), plan.size, plan.interpolation)
        else:
            for step in self.steps[: self._crop_at]:
                image = step(image, generator)
            left, top, right, bottom = plan.box
            image = F.resized_crop(
                image, top, left, bottom - top, right - left, [plan.size, plan.size], plan.interpolation, antialias=True
            )
        for step in self.steps[self._crop_at + 1 :]:
            image = step(image, generator)
        return image

    def __repr__(self) -> str:
        return f"ImageTransform({', '.join(type(s).__name__ for s in self.steps)})"


@dataclass
class BoundTransform:
    """An :class:`ImageTransform` bound to one sample's generator: ``bound(image)`` is ``transform(image, generator)``;
    ``plan(width, height)`` and ``finish(image, plan, scale)`` split that call around a reduced-size decode."""

    transform: ImageTransform
    generator: torch.Generator

    def __call__(self, image):
        return self.transform(image, self.generator)

    def plan(self, width: int, height: int) -> CropPlan | None:
        return self.transform.plan(width, height, self.generator)

    def finish(self, image: Image.Image | torch.Tensor, plan: CropPlan, scale: float = 1.0) -> torch.Tensor:
        return self.transform.finish(image, plan, self.generator, scale)


def create_transform(
    cfg: ImageTransformConfig, image_size: int, in_chans: int, mean: list[float], std: list[float], train: bool
) -> ImageTransform:
    """PIL image → normalised (C, H, W) float tensor.

    Training uses open_clip's recipe (a random resized crop over ``train_scale`` of the area, optional flip) and,
    with ``re_prob``, random erasing; evaluation resizes the short side and centre-crops. Outputs equal torchvision's
    ``convert → … → ToTensor → Normalize`` exactly (tests/data/test_transforms.py), computed more cheaply. A training
    transform lets ``decode_image`` decode JPEGs at reduced size unless ``cfg.fast_decode`` is false (a close, not
    bit-equal, result: tests/data/test_fast_decode.py states the bound).
    """
    interpolation = _INTERPOLATION[cfg.interpolation]
    steps: list[Step] = [_Mode(image_mode(in_chans))]
    if train:
        steps.append(RandomResizedCrop(image_size, cfg.train_scale, cfg.train_ratio, interpolation))
        if cfg.hflip > 0:
            steps.append(RandomHorizontalFlip(cfg.hflip))
    else:
        steps.append(ResizeCenterCrop(image_size, interpolation))
    steps.append(ToNormalizedTensor(mean, std, in_chans))
    if train and cfg.re_prob > 0:
        steps.append(RandomErasing(cfg.re_prob))
    return ImageTransform(steps, fast_decode=train and cfg.fast_decode)
