"""Raw shard samples → (image tensor, caption, label), with bad samples counted by reason instead of raised."""

from __future__ import annotations

import io
import json
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
            out["label"] = int(meta.get("label", -1)) if isinstance(meta, dict) else -1
        except (ValueError, TypeError, UnicodeDecodeError):
            log("bad_json", url, key)
            return None
    if need_image:
        view = (lambda im: transform(im, generator)) if transform is not None else None
        out["image"] = decode_image(image_bytes, view, log, url, key)
        if out["image"] is None:
            return None
    return out


def decode_image(
    image_bytes: bytes,
    transform: Callable[[Image.Image], Any] | None,
    log: BadSampleLog,
    url: str,
    key: str,
) -> Any | None:
    """``transform`` of the decoded image (else a loaded PIL copy); None, logged as ``bad_image``, if it fails."""
    try:
        with Image.open(io.BytesIO(image_bytes)) as im:
            im.load()
            return transform(im) if transform is not None else im.copy()
    except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt data; all mean "bad image"
        log("bad_image", url, f"{key}: {type(e).__name__}: {e}")
        return None


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
