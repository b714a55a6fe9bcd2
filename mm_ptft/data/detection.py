"""Detection samples: shard records with boxes → (image, target) pairs, batches, and the category table.

A detection shard sample (written by ``data_tools detection-scenes`` / ``data_tools coco``) holds an image and a
``json`` record in COCO's per-image form::

    {"image_id": 17, "width": 128, "height": 128,
     "annotations": [{"bbox": [x, y, w, h], "category_id": 3, "iscrowd": 0}, ...]}

and the dataset's ``dataset.json`` lists ``categories`` (``[{"id": 3, "name": "pullover"}, ...]``). Category ids
map to contiguous model labels ``1..K`` in the order of that list (0 is torchvision's background). A sample with a
box outside its image (beyond ``box_tolerance`` pixels), an unknown category id, a missing image or a broken record
is skipped and counted under its reason (``bad/<reason>`` in the logs), like any other bad sample.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass

import torch
from PIL import Image

from mm_ptft.config import Config, ConfigError
from mm_ptft.data.decode import BadSampleLog, decode_image
from mm_ptft.data.shards import DataError, ShardSet
from mm_ptft.data.transforms import image_mode

# bad-sample reasons added by detection (besides mm_ptft.data.BAD_REASONS)
DETECTION_BAD_REASONS = ("box_outside_image", "unknown_category", "bad_annotation")


def categories_from_meta(meta: dict, where: str) -> list[dict]:
    """``[{"id", "name"}, ...]`` from a dataset.json: its ``categories``, else its ``classnames`` as ids 1..K."""
    categories = meta.get("categories")
    if categories is None and meta.get("classnames"):
        categories = [{"id": i + 1, "name": name} for i, name in enumerate(meta["classnames"])]
    if not categories:
        raise DataError(f"data: {where} has no 'categories' (or 'classnames') in its dataset.json")
    ids = [c.get("id") for c in categories]
    if any(not isinstance(i, int) for i in ids) or len(set(ids)) != len(ids):
        raise DataError(f"data: {where}: dataset.json categories need distinct integer ids, got {ids}")
    return [{"id": int(c["id"]), "name": str(c.get("name", c["id"]))} for c in categories]


def resolve_categories(cfg: Config, shards: ShardSet | None) -> list[dict]:
    """The detection categories of a run: the training shards' dataset.json, checked against detection.num_classes."""
    categories = None
    if shards is not None and (shards.meta.get("categories") or shards.meta.get("classnames")):
        categories = categories_from_meta(shards.meta, shards.spec)
    n = cfg.detection.num_classes
    if categories is None:
        if n is None:
            raise ConfigError(
                "config: detection.num_classes is required when data.train has no dataset.json with categories"
            )
        return [{"id": i + 1, "name": str(i + 1)} for i in range(n)]
    if n is not None and n != len(categories):
        raise ConfigError(
            f"config: detection.num_classes={n} but {shards.spec} has {len(categories)} categories; drop the setting"
        )
    return categories


@dataclass
class DetectionDecoder:
    """``(raw, log) -> dict | None`` for one shard sample (picklable for DataLoader workers).

    Returns ``{"key", "image" (C, H, W) float in [0, 1], "target": {"boxes" (N, 4) xyxy, "labels" (N,),
    "iscrowd" (N,)}, "image_id"}``. Normalisation and resizing happen in the detector's transform, so predictions
    come back in the coordinates of the stored image.
    """

    category_ids: list[int]  # dataset category id of model label i + 1
    image_keys: list[str]
    in_chans: int = 3
    train: bool = False
    hflip: float = 0.0
    box_tolerance: float = 1.0

    def __post_init__(self):
        self._label = {cid: i + 1 for i, cid in enumerate(self.category_ids)}

    def __call__(self, raw: dict, log: BadSampleLog, generator: torch.Generator | None = None) -> dict | None:
        key, url = raw.get("__key__", "?"), raw.get("__url__", "?")
        image_bytes = next((raw[k] for k in self.image_keys if k in raw), None)
        if image_bytes is None:
            log("missing_image", url, key)
            return None
        try:
            record = json.loads(raw["json"])
            annotations = record.get("annotations", [])
            if not isinstance(annotations, list):
                raise TypeError("'annotations' is not a list")
        except (KeyError, ValueError, TypeError, AttributeError, UnicodeDecodeError) as e:
            log("bad_json", url, f"{key}: {type(e).__name__}: {e}")
            return None
        image = decode_image(image_bytes, lambda im: im.convert(image_mode(self.in_chans)), log, url, key)
        if image is None:
            return None
        width, height = image.size
        boxes, labels, crowd = [], [], []
        for ann in annotations:
            try:
                box, label, iscrowd = self._parse(ann, width, height)
            except BadAnnotation as e:
                log(e.reason, url, f"{key}: {e.detail}")
                return None
            boxes.append(box)
            labels.append(label)
            crowd.append(iscrowd)
        target = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "iscrowd": torch.tensor(crowd, dtype=torch.int64),
        }
        tensor = _to_tensor(image)
        if self.train and self.hflip > 0 and torch.rand((), generator=generator).item() < self.hflip:
            tensor = tensor.flip(-1)
            target["boxes"] = target["boxes"][:, [2, 1, 0, 3]] * torch.tensor([-1, 1, -1, 1]) + torch.tensor(
                [width, 0, width, 0]
            )
        image_id = record.get("image_id")
        if not isinstance(image_id, int):
            image_id = zlib.crc32(key.encode()) & 0x7FFFFFFF  # stable across ranks and runs
        return {"key": key, "image": tensor, "target": target, "image_id": image_id}

    def _parse(self, ann: dict, width: int, height: int) -> tuple[list[float], int, int]:
        """(box xyxy clipped to the image, model label, iscrowd) of one COCO annotation."""
        try:
            x, y, w, h = (float(v) for v in ann["bbox"])
            category = ann["category_id"]
        except (KeyError, TypeError, ValueError) as e:
            raise BadAnnotation("bad_annotation", f"annotation {ann!r}: {type(e).__name__}: {e}") from None
        if category not in self._label:
            known = ", ".join(str(c) for c in self.category_ids)
            raise BadAnnotation("unknown_category", f"category_id {category!r} is not in the categories ({known})")
        check_box(x, y, w, h, width, height, self.box_tolerance)
        return clip_box(x, y, w, h, width, height), self._label[category], int(ann.get("iscrowd", 0))


class BadAnnotation(ValueError):
    """An unusable annotation; ``reason`` is the bad-sample counter it goes to."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def check_box(x: float, y: float, w: float, h: float, width: int, height: int, tol: float) -> None:
    """Raise :class:`BadAnnotation` unless the xywh box lies in a ``width`` × ``height`` image (± ``tol`` px)."""
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        raise BadAnnotation("bad_annotation", f"bbox [{x:g}, {y:g}, {w:g}, {h:g}] is empty or not finite")
    if x < -tol or y < -tol or x + w > width + tol or y + h > height + tol:
        detail = f"bbox [{x:g}, {y:g}, {w:g}, {h:g}] (x, y, w, h) lies outside the {width}x{height} image"
        raise BadAnnotation("box_outside_image", detail)


def clip_box(x: float, y: float, w: float, h: float, width: int, height: int) -> list[float]:
    """xywh → xyxy clipped to the image."""
    return [max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))]


def _to_tensor(image: Image.Image) -> torch.Tensor:
    from torchvision.transforms.functional import pil_to_tensor

    return pil_to_tensor(image).float().div_(255.0)  # (C, H, W) in [0, 1]


@dataclass
class DetectionCollator:
    """Batch of decoded samples: ``image`` (B, C, H, W) when sizes agree, else a list; ``targets`` a list."""

    def __call__(self, items: list[dict]) -> dict:
        images = [item["image"] for item in items]
        same = all(im.shape == images[0].shape for im in images)
        return {
            "image": torch.stack(images) if same else images,
            "targets": [item["target"] for item in items],
            "image_id": torch.tensor([item["image_id"] for item in items], dtype=torch.int64),
            "key": [item["key"] for item in items],
        }


def dummy_detection_batch(in_chans: int, size: int) -> dict:
    """One blank image without objects: the forward a rank runs when its evaluation data ran out (ZeRO-3)."""
    empty = {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.int64),
        "iscrowd": torch.zeros(0, dtype=torch.int64),
    }
    return {
        "image": torch.zeros(1, in_chans, size, size),
        "targets": [empty],
        "image_id": torch.tensor([-1]),
        "key": ["<dummy>"],
    }


def targets_to(targets: list[dict], device: torch.device) -> list[dict]:
    return [{k: v.to(device) for k, v in t.items()} for t in targets]
