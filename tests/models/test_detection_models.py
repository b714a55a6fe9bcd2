"""Detectors on an mm-ptft tower: CNN and ViT backbones under each torchvision head learn, the gather RoIAlign
equals torchvision's, freeze policies, and the tower starts from pretraining weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CONFIGS

from mm_ptft.config import load_config
from mm_ptft.data import BadSampleLog
from mm_ptft.data.stream import read_tar
from mm_ptft.tasks import DetectionTask, configure_task, create_task

TINY = CONFIGS / "detection" / "fmnist-scenes-frcnn-tiny.yaml"
TINY_VIT = CONFIGS / "detection" / "fmnist-scenes-vit-frcnn-tiny.yaml"
ROOT = CONFIGS.parent


def _batch(scenes: Path, cfg, n: int = 4) -> dict:
    task = DetectionTask.from_config(configure_task(cfg))
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

    from mm_ptft.models.roi_align import create_multiscale_roi_align

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
    task = create_task(frozen)
    trainable = {n.split(".")[0] for n, p in task.model.named_parameters() if p.requires_grad}
    assert trainable == {"neck", "detector"}
    last = create_task(load_config(TINY, [f"data.train={scenes}", "detection.policy=last-n"]))
    names = [n for n, p in last.model.image.named_parameters() if p.requires_grad]
    assert names and all(n.startswith("trunk.layer4.") for n in names)  # last 2 groups = layer4's two blocks


def test_tower_starts_from_pretraining_weights(scenes, tmp_path):
    from mm_ptft import checkpoint as ckpt
    from mm_ptft.models import create_model

    pretrain = load_config(ROOT / "configs" / "pretrain-fmnist-cnn-tiny.yaml")
    torch.manual_seed(1)
    dual = create_model(pretrain.model)
    ckpt.save_weights(dual.state_dict(), tmp_path / "model.safetensors")
    cfg = load_config(TINY, [f"data.train={scenes}", f"detection.init={tmp_path}"])
    tower = create_task(cfg).model.image
    source = dual.image.state_dict()
    for name, value in tower.state_dict().items():
        torch.testing.assert_close(value, source[name], rtol=0, atol=0)
    assert len(tower.state_dict()) > 20
    # another architecture: one line naming the mismatch
    other = load_config(
        TINY, [f"data.train={scenes}", f"detection.init={tmp_path}", "model.image.kwargs.channels=[8,8,8,8]"]
    )
    with pytest.raises(ckpt.CheckpointError, match=r"does not fit this model \(\d+ shape mismatches"):
        create_task(other)
