"""Raw shard samples → (image tensor, caption, label), with bad samples counted by reason instead of raised.

``decode_image`` is the one place images are decoded. Given a training transform that plans its crop before decoding
(``ImageTransform.bind``), a baseline or progressive YCbCr/greyscale JPEG is decoded straight into a tensor, with
simplejpeg at the smallest DCT scale (k/8) that still gives the crop ≥ the output size, and resized by torch's uint8
kernel; every other image (PNG, WebP, CMYK JPEG, a JPEG the fast decoder refuses) takes the full PIL decode.
docs/data.md "Decoding at 224 px" has the measurements and the closeness bound.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from mm_ptft.config import Config

# reasons a sample is skipped; these names appear in metrics (bad/<reason>) and warnings
BAD_REASONS = (
    "missing_image",
    "bad_image",
    "missing_caption",
    "oversized_caption",
    "bad_json",
    "tar_error",
    "shard_open_error",
)


@dataclass
class BadSampleLog:
    """Counts skipped samples by reason and warns (rate-limited) with the shard and key of each."""

    counts: Counter = field(default_factory=Counter)
    max_warnings: int = 20
    warned: int = 0

    def __call__(self, reason: str, url: str, detail: str) -> None:
        self.counts[reason] += 1
        if self.warned < self.max_warnings:
            self.warned += 1
            warnings.warn(f"data: skipped ({reason}) in {url}: {detail}", stacklevel=2)

    def take(self) -> dict[str, int]:
        """Counts since the last call (so each batch carries the bad samples found while it was made)."""
        out = dict(self.counts)
        self.counts.clear()
        return out


def decode_sample(
    raw: dict,
    transform: Callable[..., torch.Tensor] | None,
    image_keys: list[str],
    caption_key: str,
    max_caption_chars: int,
    log: BadSampleLog,
    need_caption: bool = True,
    need_image: bool = True,
    generator: torch.Generator | None = None,
) -> dict | None:
    """Decode one raw sample into ``{"key", "label", "image"?, "caption"?}``; None (reason logged) if unusable.

    ``transform(image, generator)`` draws its randomness (crops, flips) from ``generator``."""
    key, url = raw.get("__key__", "?"), raw.get("__url__", "?")
    out: dict = {"key": key, "label": -1}
    image_bytes = next((raw[k] for k in image_keys if k in raw), None)
    if need_image and image_bytes is None:
        log("missing_image", url, key)
        return None
    if need_caption:
        caption_bytes = raw.get(caption_key)
        caption = caption_bytes.decode("utf-8", errors="replace").strip() if caption_bytes else ""
        if not caption:
            log("missing_caption", url, key)
            return None
        if len(caption) > max_caption_chars:
            log("oversized_caption", url, f"{key} ({len(caption)} chars)")
            return None
        out["caption"] = caption
    if "json" in raw:
        try:
            meta = json.loads(raw["json"])
            out["label"] = _label(meta.get("label")) if isinstance(meta, dict) else -1
        except (ValueError, UnicodeDecodeError):
            log("bad_json", url, key)
            return None
    if need_image:
        if hasattr(transform, "bind"):  # an ImageTransform: may plan its crop before decoding (fast JPEG path)
            view = transform.bind(generator)
        else:
            view = (lambda im: transform(im, generator)) if transform is not None else None
        out["image"] = decode_image(image_bytes, view, log, url, key)
        if out["image"] is None:
            return None
    return out


def _label(value: Any) -> int:
    """A json ``label`` as a class index: an integer (or integer-valued number / numeral string); anything else — a
    class name, null, NaN, as img2dataset's ``--save_additional_columns`` may write — is -1 (no label), not a bad
    sample: a contrastive run never reads labels, a classifier checks them against its classes."""
    if isinstance(value, bool):
        return -1
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return -1


def decode_image(
    image_bytes: bytes,
    transform: Callable[[Image.Image], Any] | None,
    log: BadSampleLog,
    url: str,
    key: str,
) -> Any | None:
    """``transform`` of the decoded image (else a loaded PIL copy); None, logged as ``bad_image``, if it fails.

    A ``transform`` with ``plan(width, height)`` and ``finish(image, plan, scale)`` (``ImageTransform.bind``) gets a
    JPEG decoded at reduced size when its plan allows; the crop it draws is the same either way."""
    try:
        if hasattr(transform, "plan") and image_bytes[:3] == _JPEG_MAGIC:
            planned = _decode_planned(image_bytes, transform)
            if planned is not None:
                return planned
        with Image.open(io.BytesIO(image_bytes)) as im:
            im.load()
            return transform(im) if transform is not None else im.copy()
    except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt data; all mean "bad image"
        log("bad_image", url, f"{key}: {type(e).__name__}: {e}")
        return None


# ------------------------------------------------------------------------------------- reduced-size JPEG decoding
_JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass(frozen=True)
class JpegDecoder:
    """A JPEG decoder of the fast path: ``header(data)`` → ``(width, height, handle)`` for a YCbCr, RGB or greyscale
    JPEG (None for anything else: CMYK, YCCK), ``decode(data, handle, plan, width, height)`` → ``(pixels, scale)``:
    ``(C, h, w)`` uint8 pixels in the plan's mode (C = 1 for greyscale) decoded at ``scale`` = decoded / full size,
    the smallest scale it offers at which ``plan.fits`` (1 for a decoder without DCT scaling)."""

    name: str
    header: Callable[[bytes], tuple[int, int, Any] | None]
    decode: Callable[..., tuple[torch.Tensor, float]]


def _simplejpeg_header(data: bytes) -> tuple[int, int, Any] | None:
    import simplejpeg

    height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    return (width, height, colorspace) if colorspace in ("YCbCr", "RGB", "Gray") else None


def _simplejpeg_decode(data: bytes, colorspace: str, plan, width: int, height: int) -> tuple[torch.Tensor, float]:
    import simplejpeg

    # libjpeg-turbo scales by k/8 (an IDCT of size k per 8×8 block), to ⌈dim·k/8⌉ pixels; it picks the smallest k whose
    # output is ≥ min_width × min_height, so asking for ⌈dim·k/8⌉ gets exactly k/8
    k = next((k for k in range(1, 8) if plan.fits(k / 8)), 8)
    gray = colorspace == "Gray" or plan.mode == "L"
    array = simplejpeg.decode_jpeg(
        data, "GRAY" if gray else "RGB", min_width=math.ceil(width * k / 8), min_height=math.ceil(height * k / 8)
    )  # (h, w, C) uint8
    if array.shape[:2] != (math.ceil(height * k / 8), math.ceil(width * k / 8)):
        raise ValueError(f"simplejpeg decoded {array.shape[:2]}, expected scale {k}/8 of {(height, width)}")
    return torch.from_numpy(array).permute(2, 0, 1), k / 8  # (C, h, w) channels-last view, no copy


def _pil_header(data: bytes) -> tuple[int, int, Any] | None:
    im = Image.open(io.BytesIO(data))  # parses the markers up to the first scan, decodes nothing
    if im.format != "JPEG" or im.mode not in ("RGB", "L"):
        im.close()
        return None
    return im.width, im.height, im


def _torchvision_decode(data: bytes, im: Image.Image, plan, width: int, height: int) -> tuple[torch.Tensor, float]:
    from torchvision.io import ImageReadMode, decode_jpeg

    gray = im.mode == "L" or plan.mode == "L"
    im.close()
    # no DCT scaling in torchvision: full size, straight into a (C, H, W) tensor (no PIL image, no copy out of it)
    mode = ImageReadMode.GRAY if gray else ImageReadMode.RGB
    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode), 1.0


def _pil_decode(data: bytes, im: Image.Image, plan, width: int, height: int) -> tuple[torch.Tensor, float]:
    from torchvision.transforms.functional import pil_to_tensor

    with im:
        # draft picks the largest of 1/2, 1/4, 1/8 not below what it is asked for; asking for ⌊dim / s⌋ gets 1/s
        s = next((s for s in (8, 4, 2) if plan.fits(1 / s)), 1)
        mode = "L" if plan.mode == "L" else im.mode
        drafted = im.draft(mode, (width // s, height // s)) if s > 1 or mode != im.mode else None
        scale = drafted[1][2] / width if drafted is not None else 1.0
        im.load()
        if im.mode != mode:
            im = im.convert(mode)
        return pil_to_tensor(im), scale  # (C, h, w) channels-last view


# the decoders of the fast path, in order of preference (docs/data.md "Decoding at 224 px" has the measurements):
# simplejpeg decodes at k/8 of the size; torchvision decodes in full, but into a tensor, and is already installed;
# PIL's draft (1/2, 1/4, 1/8) is the last resort: on a CPU it was slower than torchvision's full decode
JPEG_DECODERS = {
    "simplejpeg": JpegDecoder("simplejpeg", _simplejpeg_header, _simplejpeg_decode),
    "torchvision": JpegDecoder("torchvision", _pil_header, _torchvision_decode),
    "pil": JpegDecoder("pil", _pil_header, _pil_decode),
}
_chosen: list[JpegDecoder] = []


def _works(name: str) -> bool:
    """Whether a decoder's package imports and decodes a tiny JPEG (torchvision's image extension may be missing)."""
    from mm_ptft.data.transforms import CropPlan, InterpolationMode

    out = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 100, 50)).save(out, "JPEG")
    data = out.getvalue()
    try:
        width, height, handle = JPEG_DECODERS[name].header(data)
        plan = CropPlan((0, 0, 16, 16), 16, "RGB", InterpolationMode.BICUBIC)
        pixels, _ = JPEG_DECODERS[name].decode(data, handle, plan, width, height)
    except Exception:  # noqa: BLE001 - not installed, or installed without its native part
        return False
    return tuple(pixels.shape) == (3, 16, 16)


def jpeg_decoder() -> JpegDecoder:
    """The fast path's decoder: the first of ``JPEG_DECODERS`` that works here (simplejpeg where the ``fast-decode``
    extra is installed, else torchvision's)."""
    if not _chosen:
        _chosen.append(next((d for name, d in JPEG_DECODERS.items() if name == "pil" or _works(name))))
    return _chosen[0]


def _decode_planned(image_bytes: bytes, transform: Any, decoder: JpegDecoder | None = None) -> Any | None:
    """The fast path: the crop planned on the header's dimensions, the JPEG decoded as small as the crop allows, the
    rest of the transform on those pixels. None (nothing drawn yet) when it does not apply: the full path follows."""
    decoder = decoder or jpeg_decoder()
    try:
        header = decoder.header(image_bytes)
    except Exception:  # noqa: BLE001 - an unparseable header: the full PIL decode decides if the image is bad
        return None
    if header is None:
        return None
    width, height, handle = header
    plan = transform.plan(width, height)
    if plan is None:
        getattr(handle, "close", lambda: None)()
        return None
    # from here on the crop is drawn: every route ends in transform.finish with this plan, so the draws stay in order
    try:
        pixels, scale = decoder.decode(image_bytes, handle, plan, width, height)
    except Exception:  # noqa: BLE001 - a JPEG the reduced decoder refuses (strict libjpeg warnings, odd markers)
        with Image.open(io.BytesIO(image_bytes)) as im:
            im.load()  # raises for a really corrupt image: counted as bad_image by the caller
            return transform.finish(im, plan)
    return transform.finish(pixels, plan, scale)


@dataclass
class SampleDecoder:
    """``(raw, log, generator) -> dict | None``: the per-sample step of a data pipeline (picklable for DataLoader
    workers); ``generator`` is the sample's own random stream (None for deterministic evaluation views)."""

    transform: Callable[..., torch.Tensor] | None
    image_keys: list[str]
    caption_key: str = "txt"
    max_caption_chars: int = 4096
    need_caption: bool = True
    need_image: bool = True

    def __call__(self, raw: dict, log: BadSampleLog, generator: torch.Generator | None = None) -> dict | None:
        return decode_sample(
            raw,
            self.transform,
            self.image_keys,
            self.caption_key,
            self.max_caption_chars,
            log,
            self.need_caption,
            self.need_image,
            generator,
        )


@dataclass
class Collator:
    """Stack decoded samples into a batch; captions become ``input_ids``/``attention_mask`` via ``tokenize``."""

    tokenize: Callable[[list[str]], dict] | None = None

    def __call__(self, items: list[dict]) -> dict:
        batch: dict = {}
        for name in items[0]:
            values = [item[name] for item in items]
            if name == "caption" and self.tokenize is not None:
                batch.update(self.tokenize(values))
            elif torch.is_tensor(values[0]):
                batch[name] = torch.stack(values)
            elif name == "label":
                batch[name] = torch.tensor(values, dtype=torch.long)
            else:
                batch[name] = values
        return batch


@dataclass
class ImageTextSamples:
    """The sample hooks of image-caption data: a decoder (image transformed, caption kept for the tokenizer, label
    from the json), a collator, and the one-sample dummy batch a rank without data runs (ZeRO-3 evaluation).

    Tasks use it for their defaults; ``mm-ptft diff`` uses it to read probe images or texts without a task.
    """

    need_image: bool = True
    need_caption: bool = True

    def decoder(self, cfg: Config, train: bool, mean: list[float], std: list[float]) -> SampleDecoder:
        from mm_ptft.data.transforms import create_transform

        image = cfg.model.image
        transform = create_transform(cfg.data.image, image.image_size, image.in_chans, mean, std, train)
        return SampleDecoder(
            transform if self.need_image else None,
            cfg.data.image_keys,
            cfg.data.caption_key,
            cfg.data.max_caption_chars,
            need_caption=self.need_caption,
            need_image=self.need_image,
        )

    def collator(self, tokenize: Callable[[list[str]], dict] | None) -> Collator:
        return Collator(tokenize if self.need_caption else None)

    def dummy_batch(self, cfg: Config, tokenize: Callable[[list[str]], dict] | None) -> dict:
        batch: dict = {"label": torch.zeros(1, dtype=torch.long), "key": ["<dummy>"]}
        if self.need_image:
            size = cfg.model.image.image_size
            batch["image"] = torch.zeros(1, cfg.model.image.in_chans, size, size)
        if self.need_caption and tokenize is not None:
            batch.update(tokenize([""]))
        return batch
