"""The fine-tuning tasks: ``classification`` (image tower + head) and ``text-classification`` (text tower + head).

Both train under the one Trainer (any ZeRO stage, 1 or N ranks); the config's ``finetune`` section says where the
tower's weights come from, what is frozen and how the head starts::

    task: classification
    finetune: {init: runs/pretrain-fmnist, policy: full, head_init: zeroshot, label_smoothing: 0.1}
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from mm_ptft import checkpoint as ckpt
from mm_ptft.config import Config, ConfigError
from mm_ptft.data import DataError, resolve_shards
from mm_ptft.finetune.model import ImageClassifier, TextClassifier, TowerClassifier, load_tower, tower_state
from mm_ptft.tasks.base import TASKS, Task


def check_unique(names: list[str], what: str) -> None:
    """Refuse a class list with a repeated name (labels index the list, so a duplicate makes two labels one class)."""
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise ConfigError(f"config: duplicate class name '{name}' in {what} (entries {seen[name]} and {i})")
        seen[name] = i


def _dataset_meta(cfg: Config) -> tuple[dict, str]:
    """dataset.json of the training data (else of the held-out data) and where it came from."""
    for spec, split in ((cfg.data.train, cfg.data.train_split), (cfg.eval.data, cfg.eval.split)):
        if spec:
            meta = resolve_shards(spec, split).meta
            if meta:
                return meta, f"{spec}/dataset.json"
    return {}, "dataset.json"


def resolve_classes(cfg: Config) -> tuple[list[str] | None, list[str] | None, int]:
    """(class names, zero-shot templates, number of classes) from the config, else the data's dataset.json.

    Raises:
        ConfigError: a missing or duplicated class-name file, or a class count that disagrees with the names.
    """
    from mm_ptft.eval import read_lines_or_list

    names, what = read_lines_or_list(cfg.finetune.classnames, "finetune.classnames"), "finetune.classnames"
    if not names:
        names, what = read_lines_or_list(cfg.eval.classnames, "eval.classnames"), "eval.classnames"
    templates = read_lines_or_list(cfg.eval.templates, "eval.templates")
    need_templates = cfg.finetune.head_init == "zeroshot" and not templates
    if not names or need_templates:  # read the data's metadata only when the config does not say it all
        meta, where = _dataset_meta(cfg)
        if not names:
            names, what = meta.get("classnames"), where
        templates = templates or meta.get("templates")
    if names:
        check_unique(names, what)
    n = cfg.finetune.num_classes
    if names and n is not None and n != len(names):
        raise ConfigError(f"config: finetune.num_classes={n} but {what} lists {len(names)} class names")
    if not names and n is None:
        raise ConfigError("config: classification needs finetune.classnames, finetune.num_classes or dataset.json")
    return names, templates, len(names) if names else n


def head_input_of(cfg: Config) -> str:
    return cfg.finetune.head_input or ("embedding" if cfg.finetune.head_init == "zeroshot" else "pooled")


def for_loading(cfg: Config) -> Config:
    """The config that builds the same architecture without initialising it (trained weights are loaded next)."""
    out = copy.deepcopy(cfg)
    out.finetune.head_input = head_input_of(cfg)
    out.finetune.init, out.finetune.head_init = None, "random"
    return out


def check_labels(labels: torch.Tensor, keys: list[str], num_classes: int) -> None:
    """Every label must be a class index: a sample without one, or outside the class list, is a one-line error."""
    if labels.numel() == 0:
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0:
        key = keys[int((labels < 0).nonzero()[0])]
        raise DataError(f"data: sample '{key}' has no label (json 'label'); classification needs one per sample")
    if high >= num_classes:
        key = keys[int((labels >= num_classes).nonzero()[0])]
        raise DataError(
            f"data: label {high} of sample '{key}' is outside the {num_classes} classes "
            "(finetune.classnames / the dataset's classnames)"
        )


class _ClassifierTask(Task):
    """Cross-entropy (label smoothing, optional mixup/cutmix) over a :class:`TowerClassifier`."""

    def __init__(self, model: TowerClassifier, cfg: Config, classnames: list[str] | None):
        super().__init__(model)
        self.num_classes = model.num_classes
        self.classnames = classnames
        self.label_smoothing = cfg.finetune.label_smoothing
        self.mixup = None

    def logits(self, batch: dict) -> torch.Tensor:
        """(B, num_classes) float32 logits of a batch."""
        raise NotImplementedError

    def features(self, batch: dict) -> torch.Tensor:
        """(B, F) float32 head inputs of a batch (what a linear probe of this model sees)."""
        raise NotImplementedError

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        labels = batch["label"]
        check_labels(labels, batch["key"], self.num_classes)
        if self.training and self.mixup is not None:
            image, target = self.mixup(batch["image"], labels)  # target: (B, C) mixed, smoothed one-hots
            logits = self.logits({**batch, "image": image})
            loss = torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
        else:
            logits = self.logits(batch)
            loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        acc1 = (logits.argmax(dim=-1) == labels).float().mean()
        return {"loss": loss, "acc1": acc1.detach()}


class ClassificationTask(_ClassifierTask):
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

    def logits(self, batch: dict) -> torch.Tensor:
        return self.model(batch["image"]).float()

    def features(self, batch: dict) -> torch.Tensor:
        return self.model.features(batch["image"]).float()


class TextClassificationTask(_ClassifierTask):
    needs_caption = True  # the text to classify is the sample's `txt`
    needs_image = False

    def logits(self, batch: dict) -> torch.Tensor:
        return self.model(batch["input_ids"], batch["attention_mask"]).float()

    def features(self, batch: dict) -> torch.Tensor:
        return self.model.features(batch["input_ids"], batch["attention_mask"]).float()


def _check_finetune(cfg: Config, tower: str) -> None:
    ft = cfg.finetune
    checks = [
        (ft.policy != "last-n" or ft.unlocked_groups >= 1, "finetune.unlocked_groups must be >= 1 for policy last-n"),
        (0.0 <= ft.label_smoothing < 1.0, "finetune.label_smoothing must be in [0, 1)"),
        (ft.mixup >= 0 and ft.cutmix >= 0, "finetune.mixup / finetune.cutmix must be >= 0"),
        (
            ft.mixup == ft.cutmix == 0 or cfg.data.batch_size % 2 == 0,
            "finetune.mixup / cutmix need an even data.batch_size (each batch is mixed with its reverse)",
        ),
        (ft.head_init != "zeroshot" or tower == "image", "finetune.head_init=zeroshot is for the image task"),
        (tower == "image" or ft.mixup == ft.cutmix == 0, "finetune.mixup / cutmix are image augmentations"),
        (
            ft.head_init != "zeroshot" or head_input_of(cfg) == "embedding",
            "finetune.head_init=zeroshot needs finetune.head_input=embedding (the zero-shot classifier's space)",
        ),
        (ft.head_init != "zeroshot" or ft.init is not None, "finetune.head_init=zeroshot needs finetune.init"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"config: {message}")


def zeroshot_head(cfg: Config, classnames: list[str] | None, templates: list[str] | None):
    """(image tower, class embeddings (D, C), logit scale) of the dual encoder saved at ``finetune.init``."""
    from mm_ptft.eval import check_classnames, zeroshot_classifier
    from mm_ptft.models import create_tokenizer, tokenize
    from mm_ptft.models.dual_encoder import DualEncoder

    if not classnames or not templates:
        raise ConfigError("config: finetune.head_init=zeroshot needs class names and templates (eval.templates)")
    check_classnames(classnames, templates)
    source = cfg.finetune.init
    state = ckpt.load_weights(source)
    tower_state(state, "text.", f"{source} (finetune.head_init=zeroshot needs the pretraining dual encoder)")
    dual = DualEncoder(cfg.model)
    ckpt.load_model_weights(dual, state, what=str(source))
    dual.eval()
    tokenizer = create_tokenizer(cfg.model.text)
    length = cfg.model.text.context_length
    classifier = zeroshot_classifier(
        dual, lambda texts: tokenize(tokenizer, texts, length), classnames, templates, torch.device("cpu")
    )
    return dual.image, classifier, dual.get_logit_scale().item()


@TASKS.register("classification")
def build_classification(cfg: Config, rank: int = 0, world_size: int = 1) -> ClassificationTask:
    """Image tower (from ``finetune.init``'s ``image.*`` weights, or as configured) + linear head."""
    from mm_ptft.models import ImageTower, use_fused_attn

    _check_finetune(cfg, "image")
    classnames, templates, num_classes = resolve_classes(cfg)
    head_input = head_input_of(cfg)
    if cfg.finetune.head_init == "zeroshot":
        tower, classifier, scale = zeroshot_head(cfg, classnames, templates)
    else:
        tower = ImageTower(cfg.model.image, cfg.model.embed_dim, fused_attn=use_fused_attn(cfg.model))
        if cfg.finetune.init is not None:
            load_tower(tower, cfg.finetune.init, "image.")
    tower.train()
    model = ImageClassifier(tower, cfg.model.embed_dim, num_classes, head_input)
    if cfg.finetune.head_init == "zeroshot":
        model.set_zeroshot_head(classifier, scale)
    model.apply_policy(cfg.finetune.policy, cfg.finetune.unlocked_groups)
    return ClassificationTask(model, cfg, classnames)


@TASKS.register("text-classification")
def build_text_classification(cfg: Config, rank: int = 0, world_size: int = 1) -> TextClassificationTask:
    """Text tower (from ``finetune.init``'s ``text.*`` weights, or ``model.text.pretrained``) + linear head."""
    from mm_ptft.models import TextTower

    _check_finetune(cfg, "text")
    classnames, _, num_classes = resolve_classes(cfg)
    tower = TextTower(cfg.model.text, cfg.model.embed_dim)
    if cfg.finetune.init is not None:
        load_tower(tower, cfg.finetune.init, "text.")
    model = TextClassifier(tower, cfg.model.embed_dim, num_classes, head_input_of(cfg))
    model.apply_policy(cfg.finetune.policy, cfg.finetune.unlocked_groups)
    return TextClassificationTask(model, cfg, classnames)
