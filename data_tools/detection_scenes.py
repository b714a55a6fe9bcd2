"""Detection data: Fashion-MNIST scenes (items pasted onto larger canvases) and COCO JSON + image folder → shards.

``python -m data_tools detection-scenes --out data/fmnist-scenes`` writes, for each split of a fixed
train / val / test split::

    OUT/images/<split>/000000.png ...     the scenes (grayscale PNG)
    OUT/annotations/<split>.json          COCO detection JSON (categories 1..10 = Fashion-MNIST classes)
    OUT/<split>/shard-000000.tar ...      webdataset shards: key.png + key.json (COCO per-image record) + key.txt
    OUT/dataset.json                      classnames, categories, per-split pattern and counts

Train and val scenes are made of disjoint parts of Fashion-MNIST's training images, test scenes of its test images,
so no item is seen in two splits. Each scene holds ``objects`` items, each scaled by a factor in ``scale`` (nearest
28 px multiples are not required: bilinear), placed at random with at most ``max_iou`` overlap with any other box
(so some items overlap), composited with a per-pixel maximum on a black canvas. A box is the tight extent of the
item's visible pixels.

``python -m data_tools coco --ann file.json --images DIR --out D --split train`` turns any COCO detection file into
the same shard layout (the scenes take that road too): unknown categories or images stop it with a one-line error;
images with a missing file or a box outside the image are skipped, counted and listed.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_tools.fashion_mnist import CLASSNAMES, DEFAULT_SRC, load_split
from data_tools.shards import (
    DataToolsError,
    Sample,
    atomic_write_bytes,
    atomic_write_json,
    check_classnames_compatible,
    finish_split,
    prepare_split_dir,
    read_json,
    write_samples,
)

NAME = "fashion-mnist-scenes"
SPLIT_SOURCES = {"train": "train", "val": "train", "test": "test"}  # scene split → Fashion-MNIST split of its items
VAL_ITEMS = 5000  # the last 5000 (shuffled) Fashion-MNIST training images make the val scenes
VISIBLE = 10  # an item pixel above this (of 255) counts towards its box
IMAGE_EXTS = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg", ".webp": "webp"}


@dataclass
class SceneOptions:
    """How scenes look. Sizes in pixels; ``objects`` and ``scale`` are inclusive [min, max] ranges."""

    canvas: int = 128
    objects: tuple[int, int] = (2, 5)
    scale: tuple[float, float] = (1.0, 2.0)
    max_iou: float = 0.3
    counts: dict[str, int] = field(default_factory=lambda: {"train": 12000, "val": 500, "test": 1000})


def _iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def make_scene(
    rng: np.random.Generator, images: np.ndarray, labels: np.ndarray, pool: np.ndarray, opts: SceneOptions
) -> tuple[np.ndarray, list[dict]]:
    """One scene: a (canvas, canvas) uint8 image and its COCO annotations (bbox xywh, category_id = label + 1).

    Items are drawn from ``pool`` (indices into ``images``); an item that finds no place within ``max_iou`` of the
    boxes already placed after 50 tries is left out, so a scene may hold fewer than ``objects[0]`` items only when
    the canvas is very crowded.
    """
    from PIL import Image

    canvas = np.zeros((opts.canvas, opts.canvas), dtype=np.uint8)
    boxes: list[list[float]] = []
    annotations = []
    for _ in range(int(rng.integers(opts.objects[0], opts.objects[1] + 1))):
        index = int(pool[rng.integers(len(pool))])
        side = min(round(28 * rng.uniform(*opts.scale)), opts.canvas)
        item = np.asarray(Image.fromarray(images[index]).resize((side, side), Image.BILINEAR))
        ys, xs = np.nonzero(item > VISIBLE)
        if len(xs) == 0:
            continue
        for _ in range(50):
            x, y = (int(v) for v in rng.integers(0, opts.canvas - side + 1, size=2))
            box = [x + xs.min(), y + ys.min(), x + xs.max() + 1.0, y + ys.max() + 1.0]
            if all(_iou(box, other) <= opts.max_iou for other in boxes):
                break
        else:
            continue
        region = canvas[y : y + side, x : x + side]
        np.maximum(region, item, out=region)
        boxes.append(box)
        x0, y0, x1, y1 = (float(v) for v in box)
        annotations.append(
            {"bbox": [x0, y0, x1 - x0, y1 - y0], "category_id": int(labels[index]) + 1, "area": (x1 - x0) * (y1 - y0)}
        )
    return canvas, annotations


def _item_pools(src: Path, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """split → (images, labels, indices usable by that split's scenes); train/val pools are disjoint."""
    data = {name: load_split(src, name) for name in ("train", "test")}
    order = np.random.default_rng([seed, 0xD7]).permutation(len(data["train"][1]))
    return {
        "train": (*data["train"], order[:-VAL_ITEMS]),
        "val": (*data["train"], order[-VAL_ITEMS:]),
        "test": (*data["test"], np.arange(len(data["test"][1]))),
    }


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def categories() -> list[dict]:
    """Fashion-MNIST classes as COCO categories (ids 1..10; 0 stays free for torchvision's background)."""
    return [{"id": i + 1, "name": name} for i, name in enumerate(CLASSNAMES)]


def write_scene_split(out: Path, split: str, count: int, pools: dict, opts: SceneOptions, seed: int) -> Path:
    """Write ``count`` scenes of ``split`` as PNGs + a COCO JSON; returns the JSON's path."""
    from tqdm import tqdm

    images, labels, pool = pools[split]
    rng = np.random.default_rng([seed, list(SPLIT_SOURCES).index(split)])
    image_dir = out / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    coco = {"info": {"description": f"{NAME} {split}"}, "images": [], "annotations": [], "categories": categories()}
    for image_id in tqdm(range(count), desc=f"scenes {split}", unit="img", disable=count < 1000):
        canvas, annotations = make_scene(rng, images, labels, pool, opts)
        name = f"{image_id:06d}.png"
        atomic_write_bytes(image_dir / name, _png(canvas))
        coco["images"].append({"id": image_id, "file_name": name, "width": opts.canvas, "height": opts.canvas})
        for ann in annotations:
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": image_id, "iscrowd": 0, **ann})
    ann_file = out / "annotations" / f"{split}.json"
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(ann_file, coco)
    return ann_file


@dataclass
class CocoWriteResult:
    split: str
    entry: dict  # the split's dataset.json entry
    skipped: dict[str, int]  # reason → images skipped
    problems: list[str]  # the first few skipped images, one line each


def write_coco_split(
    ann_file: Path,
    image_dir: Path,
    out: Path,
    split: str,
    shard_size: int = 1000,
    overwrite: bool = False,
    name: str | None = None,
    box_tolerance: float = 1.0,
) -> CocoWriteResult:
    """Write the usable images of a COCO detection file as shards of ``split`` under ``out``.

    Each sample: the image file's bytes as they are (``png``/``jpg``/``webp``), ``json`` = ``{"image_id", "width",
    "height", "file_name", "annotations": [COCO annotations]}``, ``txt`` = the objects' class names.

    Raises:
        DataToolsError: the COCO file is unreadable or names unknown categories / images, an image format is not
            storable, no image is usable, or the class list differs from one already in ``out``.
    """
    from mm_ptft.data import DataError
    from mm_ptft.data.coco import read_coco

    try:
        dataset = read_coco(ann_file, image_dir, box_tolerance)
    except DataError as e:
        raise DataToolsError(str(e).removeprefix("data: ")) from None
    if not dataset.images:
        raise DataToolsError(f"no usable image in {ann_file} ({dict(dataset.skipped)} skipped): {dataset.problems[:1]}")
    check_classnames_compatible(out, dataset.classnames)
    split_dir = prepare_split_dir(out, split, overwrite)
    names = {c["id"]: c["name"] for c in dataset.categories}

    def samples():
        for index, image in enumerate(dataset.images):
            ext = IMAGE_EXTS.get(image.path.suffix.lower())
            if ext is None:
                raise DataToolsError(f"{image.path}: unsupported image type (use {', '.join(sorted(IMAGE_EXTS))})")
            record = {
                "image_id": image.id,
                "file_name": image.path.name,
                "width": image.width,
                "height": image.height,
                "annotations": image.annotations,
            }
            caption = "a scene with " + (", ".join(names[a["category_id"]] for a in image.annotations) or "nothing")
            yield Sample(index, image.path.read_bytes(), ext, caption, record)

    sizes = write_samples(split_dir, split, samples(), len(dataset.images), shard_size)
    entry = finish_split(out, split, sizes, name or out.name, dataset.classnames)
    meta = read_json(out / "dataset.json")
    meta["categories"] = dataset.categories
    meta.setdefault("task", "detection")
    entry["skipped"] = dict(dataset.skipped)
    meta["splits"][split] = entry
    atomic_write_json(out / "dataset.json", meta)
    return CocoWriteResult(split, entry, dict(dataset.skipped), dataset.problems)


def write_detection_scenes(
    out: Path,
    src: Path = DEFAULT_SRC,
    opts: SceneOptions | None = None,
    seed: int = 0,
    shard_size: int = 1000,
    overwrite: bool = False,
) -> dict[str, CocoWriteResult]:
    """Write Fashion-MNIST scenes (COCO JSON + images, and shards) for every split in ``opts.counts``.

    Raises:
        DataToolsError: missing Fashion-MNIST files, bad options, or shards already there without ``overwrite``.
    """
    opts = opts or SceneOptions()
    if not src.is_dir():
        raise DataToolsError(f"{src} not found; install it with: apt-get install -y dataset-fashion-mnist")
    unknown = set(opts.counts) - set(SPLIT_SOURCES)
    if unknown:
        raise DataToolsError(f"unknown scene splits {sorted(unknown)}; choose from {', '.join(SPLIT_SOURCES)}")
    if not (1 <= opts.objects[0] <= opts.objects[1]) or not (0 < opts.scale[0] <= opts.scale[1]):
        raise DataToolsError(f"bad --objects {opts.objects} or --scale {opts.scale}: need 1 <= min <= max")
    if round(28 * opts.scale[1]) > opts.canvas:
        raise DataToolsError(f"--canvas {opts.canvas} is smaller than the largest item (28 × {opts.scale[1]})")
    pools = _item_pools(src, seed)
    results = {}
    for split, count in opts.counts.items():
        if count < 1:
            continue
        ann_file = write_scene_split(out, split, count, pools, opts, seed)
        results[split] = write_coco_split(ann_file, out / "images" / split, out, split, shard_size, overwrite, NAME)
    meta = read_json(out / "dataset.json")
    meta["scenes"] = {
        "canvas": opts.canvas,
        "objects": list(opts.objects),
        "scale": list(opts.scale),
        "max_iou": opts.max_iou,
        "seed": seed,
        "items": {
            "train": "fashion-mnist train minus its last 5000 (seeded order)",
            "val": "those 5000",
            "test": "fashion-mnist test",
        },
    }
    atomic_write_json(out / "dataset.json", meta)
    return results


def describe(result: CocoWriteResult) -> str:
    """One line per split for the command line."""
    entry = result.entry
    skipped = (
        f", skipped {sum(result.skipped.values())} images ({json.dumps(result.skipped)})" if result.skipped else ""
    )
    return f"{result.split}: {entry['num_samples']} images in {entry['num_shards']} shards{skipped}"
