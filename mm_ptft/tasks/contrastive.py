"""CLIP / SigLIP pretraining: dual encoder + contrastive loss."""

from __future__ import annotations

import torch
from torch import nn

from mm_ptft.config import Config, ConfigError
from mm_ptft.losses import LOSSES, create_loss
from mm_ptft.models import create_model
from mm_ptft.tasks.base import TASKS, Task, check_text_tower


@TASKS.register("contrastive")
class ContrastiveTask(Task):
    """The dual encoder trained with ``loss.name``; evaluators see it as an image-text encoder (zero-shot,
    retrieval) and as a feature extractor (linear probe of the normalised image embedding)."""

    needs_caption = True
    sections = ("loss",)
    # feature-cached accumulation (mm_ptft.train.accumulate): each tower's input keys and output feature
    towers = {"image": "image_features", "text": "text_features"}

    def __init__(self, model: nn.Module, loss: nn.Module):
        super().__init__(model)
        self.loss = loss

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        if cfg.loss.name not in LOSSES:
            raise ConfigError(f"config: unknown loss.name '{cfg.loss.name}'; registered: {', '.join(LOSSES.list())}")
        LOSSES.get(cfg.loss.name).check_config(cfg)
        check_text_tower(cfg)

    @classmethod
    def from_config(cls, cfg: Config, rank: int = 0, world_size: int = 1) -> ContrastiveTask:
        return cls(create_model(cfg.model), create_loss(cfg.loss, rank=rank, world_size=world_size))

    def forward(
        self, batch: dict, towers: tuple[str, ...] | None = None, return_pooled: bool = False
    ) -> dict[str, torch.Tensor]:
        """The loss and metrics of ``batch``. With ``towers`` (names from :attr:`towers`), what cached accumulation
        forwards through the engine instead: only those towers' model outputs plus the logit scale and bias (and
        with ``return_pooled`` their trunk outputs); a ``{tower}_pooled`` entry in ``batch`` is a frozen trunk's
        output from before, so only that tower's projection runs."""
        if towers is not None:
            pooled = {t: batch[f"{t}_pooled"] for t in towers if f"{t}_pooled" in batch}
            image, text = "image" in towers and "image" not in pooled, "text" in towers and "text" not in pooled
            return self.model(
                image=batch["image"] if image else None,
                input_ids=batch["input_ids"] if text else None,
                attention_mask=batch["attention_mask"] if text else None,
                pooled=pooled,
                return_pooled=return_pooled,
            )
        out = self.model(image=batch["image"], input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        metrics = {"loss": self.loss(out)["loss"], "logit_scale": out["logit_scale"].detach()}
        if "logit_bias" in out:
            metrics["logit_bias"] = out["logit_bias"].detach()
        return metrics

    def frozen_trunks(self) -> set[str]:
        """Towers whose trunk (all but the projection) does not train, as LiT's locked image tower: cached
        accumulation forwards such a trunk once and its projection again."""
        return {
            name
            for name in self.towers
            if not any(
                p.requires_grad for n, p in getattr(self.model, name).named_parameters() if n.split(".")[0] != "proj"
            )
        }

    def encode_image(self, image: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.model.encode_image(image, normalize=normalize)

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, normalize: bool = True
    ) -> torch.Tensor:
        return self.model.encode_text(input_ids, attention_mask, normalize=normalize)

    def features(self, batch: dict) -> torch.Tensor:
        return self.encode_image(batch["image"]).float()
