"""Detection fine-tune: COCO mAP against hand computation, bad inputs, scenes, CNN/ViT backbones, Trainer runs.

Run as a script under torchrun, this file is also the 2-rank scenario of ``test_two_ranks_match_one``.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import FMNIST_SRC, tiny_overrides  # noqa: E402

from mm_ptft.config import DetectionConfig, load_config  # noqa: E402
from mm_ptft.data import BadSampleLog, DataError  # noqa: E402
from mm_ptft.data.stream import read_tar  # noqa: E402
from mm_ptft.finetune.detection.coco import coco_map, read_coco  # noqa: E402
from mm_ptft.finetune.detection.data import DetectionDecoder  # noqa: E402

TINY = ROOT / "configs" / "detection" / "fmnist-scenes-frcnn-tiny.yaml"
TINY_VIT = ROOT / "configs" / "detection" / "fmnist-scenes-vit-frcnn-tiny.yaml"
CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]


@pytest.fixture(scope="session")
def scenes(tmp_path_factory) -> Path:
    """64 px Fashion-MNIST scenes: 48 train / 16 val / 24 test, shards of 16."""
    if not FMNIST_SRC.is_dir():
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    from data_tools import main as data_tools_main

    out = tmp_path_factory.mktemp("scenes") / "scenes"
    args = ["detection-scenes", "--out", str(out), "--canvas", "64", "--scale", "0.8", "1.2", "--objects", "1", "3"]
    assert data_tools_main([*args, "--train", "48", "--val", "16", "--test", "24", "--shard-size", "16"]) == 0
    return out


# ---------------------------------------------------------------------------------------------------------------------
# COCO mAP (pycocotools) against hand-computed values
# ---------------------------------------------------------------------------------------------------------------------


def _coco_case():
    images = [{"id": 1, "width": 100, "height": 100}, {"id": 2, "width": 100, "height": 100}]
    truth = [
        {"image_id": 1, "bbox": [10, 10, 30, 20], "category_id": 1},
        {"image_id": 1, "bbox": [50, 50, 20, 40], "category_id": 2},
        {"image_id": 2, "bbox": [5, 60, 40, 30], "category_id": 1},
    ]
    return images, truth


def test_coco_map_perfect_is_one_and_empty_is_zero():
    images, truth = _coco_case()
    perfect = [{**t, "score": 0.9} for t in truth]
    m = coco_map(images, truth, perfect, CATEGORIES)
    for key in ("map", "map_50", "map_75", "ap/cat", "ap/dog", "ap50/cat", "ap50/dog", "mar_100"):
        assert m[key] == pytest.approx(1.0), key
    m = coco_map(images, truth, [], CATEGORIES)
    for key in ("map", "map_50", "map_75", "ap/cat", "ap/dog", "mar_100"):
        assert m[key] == 0.0, key


def test_coco_map_matches_hand_computation():
    images, truth = _coco_case()
    # class 'cat': a false positive scored above the one exact hit, the second cat is missed:
    # ranked list FP, TP → precision 1/2 at recall 1/2; COCO's 101-point interpolated AP = 0.5 × 51/101.
    # class 'dog': one exact hit → AP 1. Exact boxes: every IoU threshold agrees, so map == map_50.
    found = [
        {"image_id": 2, "bbox": [60, 0, 30, 30], "category_id": 1, "score": 0.95},
        {"image_id": 1, "bbox": [10, 10, 30, 20], "category_id": 1, "score": 0.9},
        {"image_id": 1, "bbox": [50, 50, 20, 40], "category_id": 2, "score": 0.8},
    ]
    m = coco_map(images, truth, found, CATEGORIES)
    cat = 0.5 * 51 / 101
    assert m["ap/cat"] == pytest.approx(cat)
    assert m["ap/dog"] == pytest.approx(1.0)
    assert m["map"] == pytest.approx((cat + 1.0) / 2)
    assert m["map_50"] == pytest.approx((cat + 1.0) / 2)
    # a box shifted to IoU 0.6 counts at thresholds 0.50-0.60 only: 3 of 10
    shifted = [{"image_id": 1, "bbox": [50, 59, 20, 40], "category_id": 2, "score": 0.8}]
    iou = (40 - 9) / (40 + 9)
    assert 0.6 <= iou < 0.65
    m = coco_map(images, truth, shifted, CATEGORIES)
    assert m["ap50/dog"] == pytest.approx(1.0)
    assert m["ap/dog"] == pytest.approx(0.3)


def test_coco_evaluator_scores_task_predictions():
    """The evaluator's path (xyxy → xywh, labels → category ids, gathering) on a stand-in task: perfect 1, none 0."""
    from mm_ptft.eval import EvalContext
    from mm_ptft.finetune.detection.evaluator import evaluate_coco

    categories = [{"id": 7, "name": "cat"}, {"id": 9, "name": "dog"}]  # non-contiguous ids: labels 1, 2
    target = {
        "boxes": torch.tensor([[10.0, 10.0, 40.0, 30.0], [50.0, 50.0, 70.0, 90.0]]),
        "labels": torch.tensor([1, 2]),
        "iscrowd": torch.tensor([0, 0]),
    }
    batch = {"image": torch.zeros(1, 3, 100, 100), "targets": [target], "image_id": torch.tensor([3]), "key": ["a"]}

    def context(predict):
        task = SimpleNamespace(predict=predict, categories=categories, det=DetectionConfig(draw_images=0))
        return EvalContext(task, None, lambda: [dict(batch)], lambda: batch, torch.device("cpu"))

    perfect = evaluate_coco(context(lambda b: [{**target, "scores": torch.tensor([0.9, 0.8])}]))
    assert perfect["map"] == pytest.approx(1.0) and perfect["ap/dog"] == pytest.approx(1.0)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "scores": torch.zeros(0)}
    none = evaluate_coco(context(lambda b: [empty]))
    assert none["map"] == 0.0 and none["map_50"] == 0.0 and none["n_detections"] == 0


# ---------------------------------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------------
# Backbones: CNN and ViT towers under each head learn (a few steps on one batch)
# ---------------------------------------------------------------------------------------------------------------------


def _batch(scenes: Path, cfg, n: int = 4) -> dict:
    from mm_ptft.finetune.detection.task import build_detection

    task = build_detection(cfg)
    decode = task.decoder(cfg, False, [0.0], [1.0])
    items = [decode(raw, BadSampleLog()) for raw in read_tar(str(scenes / "train" / "shard-000000.tar"), print)]
    return task, task.collator(None)(items[:n])


def _losses_fall(task, batch, steps: int = 10) -> list[float]:
    torch.manual_seed(0)
    params = [p for p in task.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    task.train()
    losses = []
    for _ in range(steps):
        out = task(batch)
        optimizer.zero_grad()
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        optimizer.step()
        losses.append(out["loss"].item())
    return losses


@pytest.mark.parametrize(
    ("config", "overrides"),
    [
        (TINY, []),
        (TINY, ["detection.head=retinanet", "detection.policy=last-n", "detection.unlocked_groups=3"]),
        (TINY, ["detection.head=fcos", "detection.anchor_sizes=null"]),
        (TINY_VIT, []),
        (TINY_VIT, ["detection.head=retinanet", "detection.strides=[4,8,16]", "detection.vit_blocks=[0,1,1]"]),
    ],
    ids=["cnn-frcnn", "cnn-retinanet-last-n", "cnn-fcos", "vit-frcnn", "vit-retinanet-pyramid"],
)
def test_backbones_learn(scenes, config, overrides):
    cfg = load_config(config, [f"data.train={scenes}", *overrides])
    torch.manual_seed(0)
    task, batch = _batch(scenes, cfg)
    losses = _losses_fall(task, batch)
    assert all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < 0.8 * np.mean(losses[:2]), losses
    task.eval()
    predictions = task.predict(batch)
    assert len(predictions) == len(batch["key"]) and predictions[0]["boxes"].shape[1] == 4


@pytest.mark.parametrize("sampling_ratio", [1, 2])
def test_gather_roi_align_matches_torchvision(sampling_ratio):
    """The embedding_bag RoIAlign against torchvision's: values and gradients, boxes past the border, 3 levels."""
    from collections import OrderedDict

    from torchvision.ops import MultiScaleRoIAlign

    from mm_ptft.finetune.detection.roi_align import create_multiscale_roi_align

    torch.manual_seed(0)
    maps = OrderedDict((str(i), torch.randn(2, 5, 32 >> i, 24 >> i, requires_grad=True)) for i in range(3))
    corner = torch.rand(40, 2) * torch.tensor([220.0, 280.0]) - 20  # some start left of / above the image
    boxes = torch.cat([corner, corner + torch.rand(40, 2) * 120 + 0.3], dim=1)
    boxes = [boxes[:25], boxes[25:]]
    shapes = [(256, 192)] * 2
    ours = create_multiscale_roi_align(list(maps), 7, sampling_ratio, canonical_scale=48)
    reference = MultiScaleRoIAlign(list(maps), 7, sampling_ratio, canonical_scale=48)
    out, ref = ours(maps, boxes, shapes), reference(maps, boxes, shapes)
    assert len(set(ours.map_levels(boxes).tolist())) == 3  # every level is used
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(ref)
    ours_grad = torch.autograd.grad(out, list(maps.values()), grad)
    for a, b in zip(ours_grad, torch.autograd.grad(ref, list(maps.values()), grad), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_policies_freeze_the_tower(scenes):
    frozen = load_config(TINY, [f"data.train={scenes}", "detection.policy=frozen"])
    from mm_ptft.finetune.detection.task import build_detection

    task = build_detection(frozen)
    trainable = {n.split(".")[0] for n, p in task.model.named_parameters() if p.requires_grad}
    assert trainable == {"neck", "detector"}
    last = build_detection(load_config(TINY, [f"data.train={scenes}", "detection.policy=last-n"]))
    names = [n for n, p in last.model.image.named_parameters() if p.requires_grad]
    assert names and all(n.startswith("trunk.layer4.") for n in names)  # last 2 groups = layer4's two blocks


# ---------------------------------------------------------------------------------------------------------------------
# Pretrained initialisation
# ---------------------------------------------------------------------------------------------------------------------


def test_tower_starts_from_pretraining_weights(scenes, tmp_path):
    from mm_ptft import checkpoint as ckpt
    from mm_ptft.finetune.detection.task import build_detection
    from mm_ptft.models import create_model

    pretrain = load_config(ROOT / "configs" / "pretrain-fmnist-cnn-tiny.yaml")
    torch.manual_seed(1)
    dual = create_model(pretrain.model)
    ckpt.save_weights(dual.state_dict(), tmp_path / "model.safetensors")
    cfg = load_config(TINY, [f"data.train={scenes}", f"detection.init={tmp_path}"])
    tower = build_detection(cfg).model.image
    source = dual.image.state_dict()
    for name, value in tower.state_dict().items():
        torch.testing.assert_close(value, source[name], rtol=0, atol=0)
    assert len(tower.state_dict()) > 20
    # another architecture: one line naming the mismatch
    other = load_config(
        TINY, [f"data.train={scenes}", f"detection.init={tmp_path}", "model.image.kwargs.channels=[8,8,8,8]"]
    )
    with pytest.raises(ckpt.CheckpointError, match=r"does not fit this model \(\d+ shape mismatches"):
        build_detection(other)


# ---------------------------------------------------------------------------------------------------------------------
# Through the Trainer and `mm-ptft eval`
# ---------------------------------------------------------------------------------------------------------------------


def test_trainer_run_reports_map_and_drawings(scenes, tmp_path):
    from mm_ptft.cli import main

    overrides = [*tiny_overrides(scenes, tmp_path, "det"), "train.steps=4"]
    assert main(["train", "-c", str(TINY), *overrides]) == 0
    run = tmp_path / "det"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    summary = next(r for r in records if r["kind"] == "summary")
    assert 0.0 <= summary["coco/map_50"] <= 1.0 and summary["coco/n_images"] == 24
    assert {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"} <= set(records[0])
    assert "![Detections on held-out images" in (run / "report.md").read_text()
    assert Image.open(run / "plots" / "detections.png").size[0] > 64
    # `mm-ptft eval` of the saved weights gives the numbers the run logged
    assert main(["eval", "--model", str(run), "--out", str(tmp_path / "eval.json")]) == 0
    again = json.loads((tmp_path / "eval.json").read_text())["metrics"]
    for key in ("coco/map", "coco/map_50", "coco/ap/bag"):
        if key in summary:
            assert again[key] == pytest.approx(summary[key], abs=1e-6), key


# ---------------------------------------------------------------------------------------------------------------------
# Two ranks: ZeRO-2 and ZeRO-3 training + lock-step evaluation; gathered metrics equal a 1-process evaluation
# ---------------------------------------------------------------------------------------------------------------------


def _two_rank_runs(out: Path, data: Path) -> None:
    from mm_ptft.train.trainer import Trainer

    for stage in (2, 3):
        # 24 test scenes over 2 ranks with batches of 5: rank 0 runs 3 forwards, rank 1 one dummy one (lock-step)
        overrides = [*tiny_overrides(data, out, f"zero{stage}"), f"deepspeed.zero_stage={stage}", "eval.batch_size=5"]
        Trainer(load_config(TINY, [*overrides, "eval.max_samples=21", "train.report=false"])).train()


@pytest.mark.dist
@pytest.mark.slow
def test_two_ranks_match_one(scenes, tmp_path):
    from mm_ptft.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [Path(sys.executable).parent / "torchrun", "--nproc-per-node", "2", "--master-port", str(port), __file__]
    proc = subprocess.run([*cmd, str(tmp_path), str(scenes)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in (2, 3):
        run = tmp_path / f"zero{stage}"
        logged = next(json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"summary"' in x)
        assert logged["coco/n_images"] == 21
        out = tmp_path / f"eval{stage}.json"
        assert main(["eval", "--model", str(run), "--out", str(out), "eval.max_samples=21"]) == 0
        single = json.loads(out.read_text())["metrics"]
        for key in ("coco/map", "coco/map_50", "coco/n_boxes", "coco/n_detections"):
            assert single[key] == pytest.approx(logged[key], abs=1e-6), (stage, key)


if __name__ == "__main__":
    _two_rank_runs(Path(sys.argv[1]), Path(sys.argv[2]))
