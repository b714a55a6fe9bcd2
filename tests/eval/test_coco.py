"""COCO mAP (pycocotools) against hand-computed values, and the ``coco`` evaluator's path on a stand-in detector."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mm_ptft.eval.coco import coco_map

CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]


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
    from mm_ptft.eval.coco import CocoSettings, evaluate_coco

    categories = [{"id": 7, "name": "cat"}, {"id": 9, "name": "dog"}]  # non-contiguous ids: labels 1, 2
    target = {
        "boxes": torch.tensor([[10.0, 10.0, 40.0, 30.0], [50.0, 50.0, 70.0, 90.0]]),
        "labels": torch.tensor([1, 2]),
        "iscrowd": torch.tensor([0, 0]),
    }
    batch = {"image": torch.zeros(1, 3, 100, 100), "targets": [target], "image_id": torch.tensor([3]), "key": ["a"]}

    def context(predict):
        task = SimpleNamespace(predict=predict, categories=categories)
        settings = {"coco": CocoSettings(draw_images=0)}
        return EvalContext(task, None, lambda: [dict(batch)], lambda: batch, torch.device("cpu"), settings=settings)

    perfect = evaluate_coco(context(lambda b: [{**target, "scores": torch.tensor([0.9, 0.8])}]))
    assert perfect["map"] == pytest.approx(1.0) and perfect["ap/dog"] == pytest.approx(1.0)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "scores": torch.zeros(0)}
    none = evaluate_coco(context(lambda b: [empty]))
    assert none["map"] == 0.0 and none["map_50"] == 0.0 and none["n_detections"] == 0
