"""COCO format: read a COCO JSON + image folder, checked, with bad images skipped and counted (scoring boxes with
pycocotools lives with the ``coco`` evaluator, :mod:`mm_ptft.eval.coco`).

Reading rules, as a user of a COCO file would expect them:

* a file that is not COCO JSON, an annotation naming an unknown ``category_id`` or an unknown ``image_id``: the
  file itself is wrong, so reading stops with a one-line :class:`~mm_ptft.data.DataError` naming the annotation;
* an image whose file is missing, or with a box outside the image (beyond ``box_tolerance`` pixels) or of no area:
  that image is skipped and counted by reason (``skipped``), with the first few listed in ``problems``.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mm_ptft.data.detection import BadAnnotation, check_box
from mm_ptft.data.shards import DataError

MAX_PROBLEMS = 20  # problems kept verbatim for the report; all are counted


@dataclass
class CocoImage:
    id: int
    path: Path
    width: int
    height: int
    annotations: list[dict]  # COCO annotations: bbox [x, y, w, h], category_id, iscrowd (+ whatever else)


@dataclass
class CocoDataset:
    """The usable images of a COCO file, its categories, and what was skipped."""

    images: list[CocoImage]
    categories: list[dict]  # [{"id", "name"}], as in the file
    skipped: Counter = field(default_factory=Counter)  # reason → images skipped
    problems: list[str] = field(default_factory=list)  # the first MAX_PROBLEMS, one line each

    @property
    def classnames(self) -> list[str]:
        return [c["name"] for c in self.categories]


def _load_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"data: cannot read COCO file {path}: {e}") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "categories")):
        raise DataError(f"data: {path} is not COCO JSON (needs 'images' and 'categories' lists)")
    return data


def read_coco(ann_file: str | Path, image_dir: str | Path, box_tolerance: float = 1.0) -> CocoDataset:
    """Read and check a COCO detection file whose ``file_name`` entries are relative to ``image_dir``.

    Raises:
        DataError: the file is not COCO JSON, or an annotation names an unknown category or image.
    """
    ann_file, image_dir = Path(ann_file), Path(image_dir)
    data = _load_json(ann_file)
    categories = [{"id": int(c["id"]), "name": str(c.get("name", c["id"]))} for c in data["categories"]]
    known = {c["id"] for c in categories}
    images = {}
    for im in data["images"]:
        try:
            images[im["id"]] = CocoImage(im["id"], image_dir / im["file_name"], int(im["width"]), int(im["height"]), [])
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"data: {ann_file}: image entry {im!r} lacks id/file_name/width/height ({e})") from None
    for ann in data.get("annotations", []):
        image = images.get(ann.get("image_id"))
        if image is None:
            raise DataError(
                f"data: {ann_file}: annotation {ann.get('id')} names unknown image_id {ann.get('image_id')!r}"
            )
        if ann.get("category_id") not in known:
            raise DataError(
                f"data: {ann_file}: annotation {ann.get('id')} (image {image.id}) has category_id "
                f"{ann.get('category_id')!r}, not one of the file's categories ({', '.join(map(str, sorted(known)))})"
            )
        image.annotations.append(ann)
    dataset = CocoDataset([], categories)
    for image in images.values():
        problem = _image_problem(image, box_tolerance)
        if problem is None:
            dataset.images.append(image)
            continue
        reason, detail = problem
        dataset.skipped[reason] += 1
        if len(dataset.problems) < MAX_PROBLEMS:
            dataset.problems.append(f"skipped image {image.id} ({image.path.name}): {detail}")
    return dataset


def _image_problem(image: CocoImage, tol: float) -> tuple[str, str] | None:
    if not image.path.is_file():
        return "missing_image", f"image file {image.path} does not exist"
    for ann in image.annotations:
        try:
            x, y, w, h = (float(v) for v in ann["bbox"])
        except (KeyError, TypeError, ValueError):
            return "bad_annotation", f"annotation {ann.get('id')} has no [x, y, w, h] bbox"
        try:
            check_box(x, y, w, h, image.width, image.height, tol)
        except BadAnnotation as e:
            return e.reason, f"annotation {ann.get('id')}: {e.detail}"
    return None
