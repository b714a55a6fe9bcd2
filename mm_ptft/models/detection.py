"""A torchvision detector on an mm-ptft image tower: tower → multi-scale maps → FPN → Faster R-CNN / RetinaNet / FCOS.

Two kinds of towers become multi-scale feature sources:

* a **CNN** (timm model whose stages halve the resolution): the stages whose stride is in ``detection.strides`` are
  taken through timm's ``forward_intermediates`` (the ``features_only`` maps, without a second copy of the trunk);
* a **ViT** (isotropic: every block at the patch stride): the tokens of ``detection.vit_blocks`` reshaped to maps
  and resampled to each stride, as ViTDet's simple feature pyramid does (transposed convs up, max-pooling down);
  the tower is built with ``dynamic_img_size`` so its position embedding follows the input size.

torchvision's FPN fuses the maps, and its detector heads do the rest. The tower keeps its mm-ptft parameter names
(``image.trunk.*``) so pretraining weights load as they are, freezing uses :meth:`ImageTower.lock`, and the
optimizer's per-tower lr scale and layer-wise decay apply to it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from mm_ptft.config import ConfigError, DetectionConfig, ImageTowerConfig
from mm_ptft.models.image_tower import ImageTower


def _is_isotropic(trunk: nn.Module) -> bool:
    """True for ViT-like trunks whose every feature has the same stride (no pyramid of their own)."""
    info = getattr(trunk, "feature_info", None)
    if not info:
        raise ConfigError(f"config: timm model {type(trunk).__name__} has no feature_info; it cannot feed a detector")
    return len({f["reduction"] for f in info}) == 1


def projection_width(weights: dict[str, torch.Tensor] | None) -> int:
    """The joint-embedding width of a tower's saved projection (1 when there are no weights to match)."""
    proj = sorted(k for k in (weights or {}) if k.startswith("proj.") and k.endswith("weight"))
    return int(weights[proj[-1]].shape[0]) if proj else 1


def create_detection_tower(cfg: ImageTowerConfig, embed_dim: int = 1, fused_attn: bool | None = None) -> ImageTower:
    """The image tower as pretraining built it; ViTs get ``dynamic_img_size`` (any input size, the same weights).

    ``embed_dim`` is the projection width of the weights that will start it (:func:`projection_width`), so they
    load strictly; the detector drops the projection after the freeze policy has been applied.
    """
    tower = ImageTower(cfg, embed_dim, fused_attn=fused_attn)
    if getattr(tower.trunk, "dynamic_img_size", True) is False:
        kwargs = {**cfg.kwargs, "dynamic_img_size": True}
        tower = ImageTower(dataclasses.replace(cfg, kwargs=kwargs), embed_dim, fused_attn=fused_attn)
    return tower


class Resample(nn.Sequential):
    """Resample a (B, C, H, W) map by a power-of-two factor: 2× transposed convs up, 2× max-pools down (ViTDet)."""

    def __init__(self, channels: int, in_stride: int, out_stride: int):
        from timm.layers import LayerNorm2d

        ratio = out_stride / in_stride
        steps = round(math.log2(ratio)) if ratio > 0 else 0
        if ratio <= 0 or 2**steps != ratio:
            raise ConfigError(f"config: detection stride {out_stride} is not a power-of-two multiple of {in_stride}")
        layers: list[nn.Module] = []
        if steps > 0:
            layers = [nn.MaxPool2d(2) for _ in range(steps)]
        for i in range(-steps):
            if i > 0:
                layers += [LayerNorm2d(channels), nn.GELU()]
            layers.append(nn.ConvTranspose2d(channels, channels, 2, stride=2))
        super().__init__(*layers)


class FeatureNeck(nn.Module):
    """Per-level maps from the tower → (resampled) → torchvision FPN → ``OrderedDict`` of (B, C_fpn, H_l, W_l)."""

    def __init__(
        self,
        in_channels: list[int],
        in_strides: list[int],
        strides: list[int],
        out_channels: int,
        extra_level: bool,
    ):
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

        self.names = [str(i) for i in range(len(strides))]
        self.resample = nn.ModuleList(
            Resample(c, s_in, s) for c, s_in, s in zip(in_channels, in_strides, strides, strict=True)
        )
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, LastLevelMaxPool() if extra_level else None)
        self.out_channels = out_channels

    def forward(self, maps: list[torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
        x = OrderedDict((name, r(m)) for name, r, m in zip(self.names, self.resample, maps, strict=True))
        return self.fpn(x)


def _call_as_forward(module: nn.Module, fn: Callable, *args, **kwargs):
    """Run ``fn`` through ``module.__call__`` so the module's forward hooks fire around it.

    ZeRO-3 gathers a module's own parameters (a ViT's ``pos_embed``, ``cls_token``) in its forward pre-hook; calling
    ``trunk.forward_intermediates`` directly would skip that hook and meet partitioned (empty) parameters.
    """
    module.forward = fn  # an instance attribute shadows the class's forward for this one call
    try:
        return module(*args, **kwargs)
    finally:
        del module.forward


class _BackboneView:
    """What torchvision's detector calls as its ``backbone``: a view onto the DetectionModel (not a submodule, so
    the tower's parameters are registered once, under ``image.``)."""

    def __init__(self, owner: DetectionModel):
        self._owner = [owner]  # a list: keeps nn.Module.__setattr__ from registering the owner as a child
        self.out_channels = owner.neck.out_channels

    def __call__(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self._owner[0].features(x)


class DetectionModel(nn.Module):
    """``image`` (the ImageTower) → ``neck`` (resampling + FPN) → ``detector`` (torchvision, holds RPN/heads).

    ``forward(images, targets)`` is torchvision's: a loss dict in training, else a list of
    ``{"boxes" (N, 4) xyxy in input-image pixels, "scores" (N,), "labels" (N,) in 1..K}``.
    """

    def __init__(
        self,
        tower: ImageTower,
        take: list[int],
        level_inputs: list[int],
        neck: FeatureNeck,
        build_detector: Callable[[_BackboneView], nn.Module],
        autocast: bool = False,
        isotropic: bool = False,
    ):
        super().__init__()
        self.image = tower
        self.neck = neck
        self.take = take  # trunk feature indices to compute (ascending)
        self.level_inputs = level_inputs  # for each pyramid level: position in the computed features
        self.autocast = autocast
        self.isotropic = isotropic
        self.detector = build_detector(_BackboneView(self))

    @property
    def dtype(self) -> torch.dtype:
        return next(self.neck.parameters()).dtype

    def _intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        kwargs = {"norm": True} if self.isotropic else {}
        return self.image.trunk.forward_intermediates(x, indices=self.take, intermediates_only=True, **kwargs)

    def features(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """(B, C, H, W) normalised batch → FPN maps ``{"0": stride strides[0], …, "pool": extra level}``."""
        cast = torch.autocast(x.device.type, dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()
        with cast:
            maps = _call_as_forward(self.image.trunk, self._intermediates, x)
        dtype = self.dtype
        return self.neck([maps[i].to(dtype) for i in self.level_inputs])

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None):
        return self.detector(images, targets)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.image.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        return {f"image.{n}" for n in self.image.no_weight_decay()}


def _level_strides(det: DetectionConfig) -> list[int]:
    return list(det.strides) + ([2 * det.strides[-1]] if det.extra_level else [])


def anchor_sizes(det: DetectionConfig) -> list[float]:
    """Base anchor size per FPN level (strides, then the extra level): configured, else 4 × stride (fcos: stride)."""
    levels = _level_strides(det)
    if det.anchor_sizes is not None:
        if len(det.anchor_sizes) != len(levels):
            raise ConfigError(
                f"config: detection.anchor_sizes needs {len(levels)} values, one per level (strides {levels})"
            )
        return [float(s) for s in det.anchor_sizes]
    return [float(s if det.head == "fcos" else 4 * s) for s in levels]


def _detector_builder(
    det: DetectionConfig, num_classes: int, mean: list[float], std: list[float], level_names: list[str]
) -> Callable[[_BackboneView], nn.Module]:
    """A function building the torchvision detector around a backbone (labels 1..K; class 0 is background)."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    sizes = anchor_sizes(det)
    n_levels = len(sizes)
    common = dict(min_size=det.min_size, max_size=det.max_size, image_mean=mean, image_std=std)
    # RetinaNet and FCOS take the same keywords (Faster R-CNN names its box_* instead)
    one_stage = dict(
        common,
        num_classes=num_classes + 1,
        score_thresh=det.score_thresh,
        detections_per_img=det.detections_per_image,
    )
    ratios = tuple(float(r) for r in det.aspect_ratios)

    def faster_rcnn(backbone: _BackboneView) -> nn.Module:
        from torchvision.models.detection import FasterRCNN
        from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

        from mm_ptft.models.roi_align import create_multiscale_roi_align

        train_props, eval_props = det.rpn_proposals
        return FasterRCNN(
            backbone,
            rpn_anchor_generator=AnchorGenerator(tuple((s,) for s in sizes), (ratios,) * n_levels),
            rpn_pre_nms_top_n_train=train_props,
            rpn_post_nms_top_n_train=train_props,
            rpn_pre_nms_top_n_test=eval_props,
            rpn_post_nms_top_n_test=eval_props,
            box_roi_pool=create_multiscale_roi_align(level_names, 7, det.roi_sampling_ratio),
            box_head=TwoMLPHead(backbone.out_channels * 7 * 7, det.representation_size),
            box_predictor=FastRCNNPredictor(det.representation_size, num_classes + 1),
            box_batch_size_per_image=det.roi_batch_size,
            box_score_thresh=det.score_thresh,
            box_detections_per_img=det.detections_per_image,
            **common,
        )

    def retinanet(backbone: _BackboneView) -> nn.Module:
        from torchvision.models.detection import RetinaNet
        from torchvision.models.detection.retinanet import RetinaNetHead

        octaves = tuple(tuple(s * 2 ** (i / 3) for i in range(3)) for s in sizes)
        anchors = AnchorGenerator(octaves, (ratios,) * n_levels)
        # GroupNorm in the head (torchvision's RetinaNet v2): without it the focal loss spiked in a few steps here
        norm = functools.partial(nn.GroupNorm, math.gcd(32, backbone.out_channels))
        head = RetinaNetHead(backbone.out_channels, anchors.num_anchors_per_location()[0], num_classes + 1, norm)
        return RetinaNet(backbone, anchor_generator=anchors, head=head, **one_stage)

    def fcos(backbone: _BackboneView) -> nn.Module:
        from torchvision.models.detection import FCOS
        from torchvision.models.detection.fcos import FCOSHead

        if backbone.out_channels % 32:
            raise ConfigError("config: detection.head=fcos needs detection.fpn_channels divisible by 32 (GroupNorm)")
        anchors = AnchorGenerator(tuple((s,) for s in sizes), ((1.0,),) * n_levels)
        head = FCOSHead(backbone.out_channels, 1, num_classes + 1, num_convs=det.head_convs)
        return FCOS(backbone, anchor_generator=anchors, head=head, **one_stage)

    return {"faster_rcnn": faster_rcnn, "retinanet": retinanet, "fcos": fcos}[det.head]


def _select_levels(tower: ImageTower, det: DetectionConfig) -> tuple[list[int], list[int], list[int], list[int]]:
    """(trunk indices to compute, per-level position among them, per-level channels, per-level input stride)."""
    info = tower.trunk.feature_info
    n = len(info)
    if _is_isotropic(tower.trunk):
        blocks = list(det.vit_blocks)
        if len(blocks) == 1:
            blocks = blocks * len(det.strides)
        if len(blocks) != len(det.strides):
            raise ConfigError(
                f"config: detection.vit_blocks needs 1 or {len(det.strides)} entries (one per stride), got {blocks}"
            )
        if any(not -n <= b < n for b in blocks):
            raise ConfigError(f"config: detection.vit_blocks {blocks} out of range for a {n}-block ViT")
        wanted = [b % n for b in blocks]
    else:
        reductions = [f["reduction"] for f in info]
        wanted = []
        for s in det.strides:
            matches = [i for i, r in enumerate(reductions) if r == s]
            if not matches:
                raise ConfigError(
                    f"config: detection.strides: {type(tower.trunk).__name__} has no stage at stride {s} "
                    f"(its stages: {sorted(set(reductions))})"
                )
            wanted.append(matches[-1])
    take = sorted(set(wanted))
    return (
        take,
        [take.index(i) for i in wanted],
        [info[i]["num_chs"] for i in wanted],
        [info[i]["reduction"] for i in wanted],
    )


def create_detection_model(
    tower: ImageTower, det: DetectionConfig, num_classes: int, mean: list[float], std: list[float]
) -> DetectionModel:
    """Build the detector around ``tower`` (:func:`create_detection_tower`, already holding its starting weights).
    The freeze policy is applied before unused trunk parts are pruned."""
    if sorted(det.strides) != list(det.strides) or len(set(det.strides)) != len(det.strides):
        raise ConfigError(f"config: detection.strides must increase, got {det.strides}")
    if len(det.rpn_proposals) != 2:
        raise ConfigError("config: detection.rpn_proposals needs [train, eval]")
    isotropic = _is_isotropic(tower.trunk)
    take, level_inputs, channels, in_strides = _select_levels(tower, det)
    if det.policy == "frozen":
        tower.lock(0, freeze_bn_stats=True)
    elif det.policy == "last-n":
        tower.lock(det.unlocked_groups, freeze_bn_stats=det.freeze_bn)
    if det.freeze_bn:
        from timm.layers import freeze_batch_norm_2d

        tower.trunk = freeze_batch_norm_2d(tower.trunk)
    tower.trunk.prune_intermediate_layers(take, prune_norm=not isotropic, prune_head=True)
    tower.proj = nn.Identity()  # the joint-embedding projection has no part in detection
    neck = FeatureNeck(channels, in_strides, list(det.strides), det.fpn_channels, det.extra_level)
    build = _detector_builder(det, num_classes, mean, std, neck.names)
    return DetectionModel(tower, take, level_inputs, neck, build, det.autocast, isotropic)
