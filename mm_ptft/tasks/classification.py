"""Fine-tuning tasks: ``classification`` (image tower + head) and ``text-classification`` (text tower + head).

Both train under the one Trainer (any ZeRO stage, 1 or N ranks); the config's ``finetune`` section says where the
tower's weights come from, what is frozen and how the head starts::

    task: classification
    finetune: {init: runs/pretrain-fmnist, policy: full, head_init: zeroshot, label_smoothing: 0.1}
"""

from __future__ import annotations

import abc

import torch
import torch.nn.functional as F

from mm_ptft.config import Config, ConfigError
from mm_ptft.data import resolve_shards
from mm_ptft.data.classes import check_labels, resolve_classes
from mm_ptft.data.mix import source_paths
from mm_ptft.finetune.init import head_input_of, load_tower, zeroshot_head
from mm_ptft.finetune.policy import apply_policy
from mm_ptft.models import ImageTower, TextTower
from mm_ptft.models.classifier import ImageClassifier, TextClassifier, TowerClassifier
from mm_ptft.tasks.base import TASKS, Task, check_text_tower


def _dataset_metas(cfg: Config) -> list[tuple[dict, str]]:
    """dataset.json of the training data, then of the held-out data (those that exist)."""
    metas = []
    for spec, split in (*source_paths(cfg.data), (cfg.eval.data, cfg.eval.split)):
        if spec:
            meta = resolve_shards(spec, split, cfg.data.remote).meta
            if meta:
                metas.append((meta, f"{spec}/dataset.json"))
    return metas


def classes_of(cfg: Config) -> tuple[list[str] | None, list[str] | None, int]:
    """(class names, zero-shot templates, number of classes): ``finetune.classnames``, else ``eval.classnames``,
    else the data's dataset.json.

    Raises:
        ConfigError: a missing or duplicated class-name file, or a class count that disagrees with the names.
    """
    sources = [(cfg.finetune.classnames, "finetune.classnames"), (cfg.eval.classnames, "eval.classnames")]
    need_meta = not any(v for v, _ in sources) or (cfg.finetune.head_init == "zeroshot" and not cfg.eval.templates)
    metas = _dataset_metas(cfg) if need_meta else []  # read the data's metadata only when the config is silent
    names, templates = resolve_classes(sources, cfg.eval.templates, metas)
    n = cfg.finetune.num_classes
    if names and n is not None and n != len(names):
        raise ConfigError(f"config: finetune.num_classes={n} but the class list has {len(names)} names")
    if not names and n is None:
        raise ConfigError("config: classification needs finetune.classnames, finetune.num_classes or dataset.json")
    return names, templates, len(names) if names else n


class _ClassifierTask(Task):
    """Cross-entropy (label smoothing, optional mixup/cutmix) over a :class:`TowerClassifier`."""

    sections = ("finetune",)
    tower = "image"

    def __init__(self, model: TowerClassifier, cfg: Config, classnames: list[str] | None):
        super().__init__(model)
        self.num_classes = model.num_classes
        self.classnames = classnames
        self.label_smoothing = cfg.finetune.label_smoothing
        self.mixup = None

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        ft = cfg.finetune
        checks = [
            (ft.policy != "last-n" or ft.unlocked_groups >= 1, "finetune.unlocked_groups must be >= 1 for last-n"),
            (0.0 <= ft.label_smoothing < 1.0, "finetune.label_smoothing must be in [0, 1)"),
            (ft.mixup >= 0 and ft.cutmix >= 0, "finetune.mixup / finetune.cutmix must be >= 0"),
            (
                ft.mixup == ft.cutmix == 0 or cfg.data.batch_size % 2 == 0,
                "finetune.mixup / cutmix need an even data.batch_size (each batch is mixed with its reverse)",
            ),
            (ft.head_init != "zeroshot" or cls.tower == "image", "finetune.head_init=zeroshot is for the image task"),
            (cls.tower == "image" or ft.mixup == ft.cutmix == 0, "finetune.mixup / cutmix are image augmentations"),
            (
                ft.head_init != "zeroshot" or head_input_of(cfg) == "embedding",
                "finetune.head_init=zeroshot needs finetune.head_input=embedding (the zero-shot classifier's space)",
            ),
            (ft.head_init != "zeroshot" or ft.init is not None, "finetune.head_init=zeroshot needs finetune.init"),
            (ft.lora.rank >= 1, f"finetune.lora.rank must be >= 1, got {ft.lora.rank}"),
            (ft.lora.alpha > 0, f"finetune.lora.alpha must be > 0, got {ft.lora.alpha}"),
            (0.0 <= ft.lora.dropout < 1.0, f"finetune.lora.dropout must be in [0, 1), got {ft.lora.dropout}"),
            (ft.lora.target_modules != [], "finetune.lora.target_modules is empty (null: the tower's defaults)"),
            (ft.ia3.target_modules != [], "finetune.ia3.target_modules is empty (null: the tower's defaults)"),
            (
                ft.policy != "ia3" or cfg.deepspeed.zero_stage < 3,
                "finetune.policy=ia3 needs deepspeed.zero_stage <= 2 (ZeRO-3 does not gather peft's IA3 scales, "
                "which no submodule's forward owns); lora and bias train under ZeRO-3",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"config: {message}")
        if cls.tower == "text" or ft.head_init == "zeroshot":
            check_text_tower(cfg)

    @abc.abstractmethod
    def logits(self, batch: dict) -> torch.Tensor:
        """(B, num_classes) float32 logits of a batch."""

    @abc.abstractmethod
    def features(self, batch: dict) -> torch.Tensor:
        """(B, F) float32 head inputs of a batch (what a linear probe of this model sees)."""

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        labels = batch["label"]
        check_labels(labels, self.num_classes, keys=batch["key"])
        if self.training and self.mixup is not None:
            image, target = self.mixup(batch["image"], labels)  # target: (B, C) mixed, smoothed one-hots
            logits = self.logits({**batch, "image": image})
            loss = torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
        else:
            logits = self.logits(batch)
            loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        acc1 = (logits.argmax(dim=-1) == labels).float().mean()
        return {"loss": loss, "acc1": acc1.detach()}


@TASKS.register("classification")
class ClassificationTask(_ClassifierTask):
    """Image tower (from ``finetune.init``'s ``image.*`` weights, or as configured) + linear head."""

    needs_caption = False
    needs_image = True

    def __init__(self, model: ImageClassifier, cfg: Config, classnames: list[str] | None):
        super().__init__(model, cfg, classnames)
        ft = cfg.finetune
        if ft.mixup > 0 or ft.cutmix > 0:
            from timm.data import Mixup

            self.mixup = Mixup(
                mixup_alpha=ft.mixup,
                cutmix_alpha=ft.cutmix,
                prob=ft.mixup_prob,
                label_smoothing=ft.label_smoothing,
                num_classes=self.num_classes,
            )

    @classmethod
    def from_config(cls, cfg: Config, rank: int = 0, world_size: int = 1) -> ClassificationTask:
        from mm_ptft.models import use_fused_attn

        classnames, templates, num_classes = classes_of(cfg)
        if cfg.finetune.head_init == "zeroshot":
            tower, classifier, scale = zeroshot_head(cfg, classnames, templates)
        else:
            tower = ImageTower(cfg.model.image, cfg.model.embed_dim, fused_attn=use_fused_attn(cfg.model))
            if cfg.finetune.init is not None:
                load_tower(tower, cfg.finetune.init, "image.")
        tower.train()
        model = ImageClassifier(tower, cfg.model.embed_dim, num_classes, head_input_of(cfg))
        if cfg.finetune.head_init == "zeroshot":
            model.set_zeroshot_head(classifier, scale)
        apply_policy(model, cfg.finetune)
        return cls(model, cfg, classnames)

    def image_logits(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image).float()

    def logits(self, batch: dict) -> torch.Tensor:
        return self.image_logits(batch["image"])

    def features(self, batch: dict) -> torch.Tensor:
        return self.model.features(batch["image"]).float()


@TASKS.register("text-classification")
class TextClassificationTask(_ClassifierTask):
    """Text tower (from ``finetune.init``'s ``text.*`` weights, or ``model.text.pretrained``) + linear head."""

    needs_caption = True  # the text to classify is the sample's `txt`
    needs_image = False
    tower = "text"

    @classmethod
    def from_config(cls, cfg: Config, rank: int = 0, world_size: int = 1) -> TextClassificationTask:
        classnames, _, num_classes = classes_of(cfg)
        tower = TextTower(cfg.model.text, cfg.model.embed_dim)
        if cfg.finetune.init is not None:
            load_tower(tower, cfg.finetune.init, "text.")
        model = TextClassifier(tower, cfg.model.embed_dim, num_classes, head_input_of(cfg))
        apply_policy(model, cfg.finetune)
        return cls(model, cfg, classnames)

    def logits(self, batch: dict) -> torch.Tensor:
        return self.model(batch["input_ids"], batch["attention_mask"]).float()

    def features(self, batch: dict) -> torch.Tensor:
        return self.model.features(batch["input_ids"], batch["attention_mask"]).float()
