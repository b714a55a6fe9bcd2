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
    transform: Callable[[Image.Image], torch.Tensor] | None,
    image_keys: list[str],
    caption_key: str,
    max_caption_chars: int,
    log: BadSampleLog,
    need_caption: bool = True,
    need_image: bool = True,
) -> dict | None:
    """Decode one raw sample into ``{"key", "label", "image"?, "caption"?}``; None (reason logged) if unusable."""
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
        out["image"] = decode_image(image_bytes, transform, log, url, key)
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
    """``(raw, log) -> dict | None``: the per-sample step of a data pipeline (picklable for DataLoader workers)."""

    transform: Callable[[Image.Image], torch.Tensor] | None
    image_keys: list[str]
    caption_key: str = "txt"
    max_caption_chars: int = 4096
    need_caption: bool = True
    need_image: bool = True

    def __call__(self, raw: dict, log: BadSampleLog) -> dict | None:
        return decode_sample(raw, self.transform, self.image_keys, self.caption_key, self.max_caption_chars, log,
                             self.need_caption, self.need_image)


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
