"""The ``detection`` task: a torchvision detector on the pretrained image tower, trained by the one Trainer.

``forward(batch)`` returns ``{"loss": sum of torchvision's losses, <each loss>: detached}``; :meth:`predict` gives
the detections the ``coco`` evaluator scores. Samples are decoded by :class:`DetectionDecoder` (boxes, labels,
flips), batched by :class:`DetectionCollator`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mm_ptft.config import Config, ConfigError
from mm_ptft.data.detection import (
    DetectionCollator,
    DetectionDecoder,
    dummy_detection_batch,
    resolve_categories,
    targets_to,
)
from mm_ptft.models.detection import (
    DetectionModel,
    create_detection_model,
    create_detection_tower,
    projection_width,
)
from mm_ptft.tasks.base import TASKS, Task


@TASKS.register("detection")
class DetectionTask(Task):
    """Detector + its data hooks. ``categories`` (``[{"id", "name"}]``) map model labels 1..K to dataset ids."""

    needs_caption = False
    sections = ("detection",)

    def __init__(self, model: DetectionModel, categories: list[dict], cfg: Config):
        super().__init__(model)
        self.categories = categories
        self.det = cfg.detection
        self.in_chans = cfg.model.image.in_chans

    def _images(self, batch: dict) -> list[torch.Tensor]:
        dtype = self.model.dtype
        images = batch["image"]
        device = images.device if torch.is_tensor(images) else images[0].device
        images = list(images.unbind(0)) if torch.is_tensor(images) else images
        return [im.to(device=device, dtype=dtype) for im in images]

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        images = self._images(batch)
        targets = []
        for t in targets_to(batch["targets"], images[0].device):
            keep = t["iscrowd"] == 0  # torchvision's losses have no notion of crowd regions: train on the rest
            targets.append({"boxes": t["boxes"][keep].to(images[0].dtype), "labels": t["labels"][keep]})
        losses = self.model(images, targets)
        out = {"loss": sum(losses.values())}
        out.update({name: value.detach() for name, value in losses.items()})
        return out

    @torch.no_grad()
    def predict(self, batch: dict) -> list[dict[str, torch.Tensor]]:
        """Detections per image (model in eval mode): ``boxes`` (N, 4) xyxy, ``scores``, ``labels`` 1..K, on CPU."""
        out = self.model(self._images(batch))
        return [{k: v.detach().float().cpu() if k != "labels" else v.cpu() for k, v in d.items()} for d in out]

    def decoder(self, cfg: Config, train: bool, mean: list[float], std: list[float]) -> Callable:
        # normalisation (mean/std) happens in the detector's transform, so predictions map back to stored pixels
        return DetectionDecoder(
            [c["id"] for c in self.categories],
            cfg.data.image_keys,
            cfg.model.image.in_chans,
            train,
            cfg.detection.hflip if train else 0.0,
            cfg.detection.box_tolerance,
        )

    def collator(self, tokenize: Callable[[list[str]], dict] | None) -> Callable:
        return DetectionCollator()

    def dummy_batch(self, cfg: Config, tokenize: Callable[[list[str]], dict] | None) -> dict:
        return dummy_detection_batch(cfg.model.image.in_chans, min(cfg.detection.min_size, cfg.detection.max_size))

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        det = cfg.detection
        if det.unlocked_groups < 0 or det.fpn_channels < 1 or det.min_size < 1 or det.max_size < det.min_size:
            raise ConfigError(
                "config: detection needs unlocked_groups >= 0, fpn_channels >= 1 and 1 <= min_size <= max_size"
            )
        if cfg.deepspeed.precision == "bf16":
            raise ConfigError(
                "config: deepspeed.precision=bf16 casts the whole detector to bf16, where torchvision's box "
                "arithmetic loses pixels and its CPU nms has no kernel; use fp32 (+ detection.autocast=true) or "
                "amp_bf16"
            )

    @classmethod
    def from_config(cls, cfg: Config, rank: int = 0, world_size: int = 1) -> DetectionTask:
        """Detector on ``cfg.model.image`` (from ``detection.init``'s image tower, or random), classes from the
        data."""
        from mm_ptft import checkpoint as ckpt
        from mm_ptft.data import resolve_shards
        from mm_ptft.data.mix import source_paths
        from mm_ptft.data.stats import image_norm_stats
        from mm_ptft.finetune.init import tower_state
        from mm_ptft.models import use_fused_attn

        det = cfg.detection
        if isinstance(cfg.data.train, list) and len(cfg.data.train) > 1:
            raise ConfigError(
                "config: data.train: the detection task reads one source (its categories define the classes); "
                "a weighted mixture is for image-text pretraining"
            )
        paths = source_paths(cfg.data)
        shards = resolve_shards(*paths[0], cfg.data.remote) if paths else None
        categories = resolve_categories(cfg, shards)
        mean, std = image_norm_stats(cfg)
        weights = tower_state(ckpt.load_weights(det.init), "image.", det.init) if det.init else None
        tower = create_detection_tower(cfg.model.image, projection_width(weights), use_fused_attn(cfg.model))
        if weights is not None:
            ckpt.load_model_weights(tower, weights, what="detection.init (its image.* weights)")
        return cls(create_detection_model(tower, det, len(categories), mean, std), categories, cfg)
