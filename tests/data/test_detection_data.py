"""Detection data: the box decoder's bad samples and flips, COCO files read and checked, the Fashion-MNIST scenes."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import FMNIST_SRC
from PIL import Image

from mm_ptft.data import BadSampleLog, DataError
from mm_ptft.data.coco import read_coco
from mm_ptft.data.detection import DetectionDecoder

CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]


def _png(size: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size), 128, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _raw(annotations: list[dict], image: bytes | None = None) -> dict:
    raw = {"__key__": "k1", "__url__": "shard.tar", "json": json.dumps({"image_id": 1, "annotations": annotations})}
    if image is not None:
        raw["png"] = image
    return raw


def test_decoder_skips_and_counts_bad_samples():
    decode = DetectionDecoder([1, 2], ["png"], 3)
    log = BadSampleLog()
    good = decode(_raw([{"bbox": [10, 10, 20, 20], "category_id": 2}], _png()), log)
    assert good["target"]["labels"].tolist() == [2]
    assert good["target"]["boxes"].tolist() == [[10, 10, 30, 30]]
    assert good["image"].shape == (3, 64, 64)
    cases = [
        ([{"bbox": [50, 10, 20, 20], "category_id": 1}], _png(), "box_outside_image", "outside the 64x64 image"),
        ([{"bbox": [1, 1, 5, 5], "category_id": 99}], _png(), "unknown_category", r"category_id 99 is not in.*1, 2"),
        ([{"bbox": [1, 1, 5, 5], "category_id": 1}], None, "missing_image", "k1"),
    ]
    for anns, image, reason, message in cases:
        with pytest.warns(UserWarning, match=rf"data: skipped \({reason}\) in shard.tar: .*{message}"):
            assert decode(_raw(anns, image), log) is None
    assert log.take() == {"box_outside_image": 1, "unknown_category": 1, "missing_image": 1}
    # within the tolerance a box is clipped, not refused
    clipped = decode(_raw([{"bbox": [50, 10, 14.5, 20], "category_id": 1}], _png()), log)
    assert clipped["target"]["boxes"].tolist() == [[50, 10, 64, 30]]


def test_decoder_flip_moves_boxes_with_pixels():
    pixels = np.zeros((32, 48), dtype=np.uint8)
    pixels[5:9, 3:13] = 255  # the object: x 3..13, y 5..9
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    decode = DetectionDecoder([1], ["png"], 1, train=True, hflip=1.0)
    out = decode(_raw([{"bbox": [3, 5, 10, 4], "category_id": 1}], buffer.getvalue()), BadSampleLog())
    x0, y0, x1, y1 = (int(v) for v in out["target"]["boxes"][0].tolist())
    assert (x0, y0, x1, y1) == (48 - 13, 5, 48 - 3, 9)
    image = out["image"][0]
    assert image[y0:y1, x0:x1].min() == 1.0 and image.sum() == (x1 - x0) * (y1 - y0)  # all bright pixels inside


def _coco_file(tmp_path: Path, annotations: list[dict], missing: bool = False) -> Path:
    images = []
    for i in (1, 2, 3):
        name = f"{i}.png"
        if not (missing and i == 3):
            (tmp_path / name).write_bytes(_png())
        images.append({"id": i, "file_name": name, "width": 64, "height": 64})
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return path


def test_read_coco_skips_bad_images_and_refuses_unknown_categories(tmp_path, capsys):
    from data_tools import main as data_tools_main

    annotations = [
        {"id": 1, "image_id": 1, "bbox": [1, 1, 10, 10], "category_id": 1},
        {"id": 2, "image_id": 2, "bbox": [60, 1, 10, 10], "category_id": 2},  # outside the 64 px image
        {"id": 3, "image_id": 3, "bbox": [1, 1, 10, 10], "category_id": 2},  # its file is missing
    ]
    dataset = read_coco(_coco_file(tmp_path, annotations, missing=True), tmp_path)
    assert [im.id for im in dataset.images] == [1]
    assert dict(dataset.skipped) == {"box_outside_image": 1, "missing_image": 1}
    assert any("image 2 (2.png): annotation 2: bbox [60, 1, 10, 10]" in p for p in dataset.problems)
    assert any("image 3 (3.png): image file" in p and "does not exist" in p for p in dataset.problems)

    # the data_tools command writes the usable image, warns about the others
    out = tmp_path / "shards"
    args = ["coco", "--ann", str(tmp_path / "ann.json"), "--images", str(tmp_path), "--out", str(out)]
    assert data_tools_main(args) == 0
    err = capsys.readouterr()
    assert "warning: skipped image 2" in err.err and "train: 1 images in 1 shards, skipped 2 images" in err.out
    assert json.loads((out / "dataset.json").read_text())["categories"] == CATEGORIES

    unknown = [{"id": 4, "image_id": 1, "bbox": [1, 1, 10, 10], "category_id": 99}]
    with pytest.raises(DataError, match=r"annotation 4 \(image 1\) has category_id 99, not one of .*\(1, 2\)"):
        read_coco(_coco_file(tmp_path, unknown), tmp_path)
    assert data_tools_main([*args, "--overwrite"]) == 2
    assert "error: " in capsys.readouterr().err


def test_scenes_boxes_cover_items_and_splits_are_fixed(scenes, tmp_path):
    from data_tools.detection_scenes import _item_pools

    meta = json.loads((scenes / "dataset.json").read_text())
    assert {s: meta["splits"][s]["num_samples"] for s in ("train", "val", "test")} == {
        "train": 48,
        "val": 16,
        "test": 24,
    }
    coco = json.loads((scenes / "annotations" / "test.json").read_text())
    per_image = {}
    for ann in coco["annotations"]:
        per_image.setdefault(ann["image_id"], []).append(ann)
    sizes = []
    for image in coco["images"]:
        pixels = np.asarray(Image.open(scenes / "images" / "test" / image["file_name"]))
        covered = np.zeros_like(pixels, dtype=bool)
        for ann in per_image.get(image["id"], []):
            x, y, w, h = (int(v) for v in ann["bbox"])
            covered[y : y + h, x : x + w] = True
            assert pixels[y : y + h, x : x + w].max() > 10  # each box holds a visible item
            sizes.append(max(w, h))
        assert not (pixels[~covered] > 10).any()  # every visible pixel belongs to some box
    assert min(len(v) for v in per_image.values()) >= 1 and max(len(v) for v in per_image.values()) <= 3
    assert max(sizes) > min(sizes)  # varied scales
    # the split is fixed: train and val scenes draw on disjoint Fashion-MNIST images, the same for the same seed
    pools = _item_pools(FMNIST_SRC, 0)
    assert not set(pools["train"][2]) & set(pools["val"][2])
    with tarfile.open(scenes / "test" / "shard-000000.tar") as tar:
        first = json.loads(tar.extractfile(next(m for m in tar if m.name.endswith(".json"))).read())
    assert first["annotations"] == per_image[first["image_id"]]
