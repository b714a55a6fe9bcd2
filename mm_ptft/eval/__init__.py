"""Evaluators chosen by name in the config (``eval.evaluators``): zero-shot classification, retrieval, …

An evaluator is ``fn(ctx: EvalContext) -> dict[str, float]``; metric names follow CLIP_benchmark and are prefixed
with the evaluator's name in logs (``zeroshot/acc1``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mm_ptft.config import ConfigError
from mm_ptft.distributed import all_gather_tensor, any_true
from mm_ptft.eval.metrics import classification_metrics, retrieval_metrics
from mm_ptft.registry import Registry

EVALUATORS: Registry[Callable] = Registry("evaluator")


def read_lines_or_list(value: list[str] | str | None, what: str) -> list[str] | None:
    """A list from the config, or the non-empty lines of a file it names."""
    if value is None or isinstance(value, list):
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(f"config: {what} file not found: {path}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def check_classnames(classnames: list[str], templates: list[str]) -> None:
    seen: dict[str, int] = {}
    for i, name in enumerate(classnames):
        if name in seen:
            raise ConfigError(f"eval: duplicate class name '{name}' (entries {seen[name]} and {i})")
        seen[name] = i
    for t in templates:
        if "{}" not in t and "{c}" not in t:
            raise ConfigError(f"eval: template '{t}' has no '{{}}' for the class name")


@dataclass
class EvalContext:
    """What evaluators share: the task and model, a tokenizer, held-out batches, class names; features are cached.

    ``batches`` is a callable returning a fresh iterable of this rank's batches. Every rank must run the same
    number of forward passes (ZeRO-3 gathers parameters collectively), so :meth:`iterate` keeps ranks in
    lock-step and hands ``dummy_batch()`` (flagged not real) to a rank whose data ran out first.
    """

    task: torch.nn.Module
    tokenize: Callable[[list[str]], dict] | None
    batches: Callable[[], Iterable[dict]]
    dummy_batch: Callable[[], dict]
    device: torch.device
    classnames: list[str] | None = None
    templates: list[str] | None = None
    bad_samples: int = 0
    out_dir: Path | None = None  # the run directory, where evaluators may write figures (None: write none)
    images: dict[str, Path] = field(default_factory=dict)  # figures written, caption → path (for the run report)
    _features: dict | None = field(default=None, repr=False)

    @property
    def model(self) -> torch.nn.Module:
        return self.task.model

    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def iterate(self) -> Iterator[tuple[dict, bool]]:
        """This rank's batches as ``(batch on device, is_real)``, in lock-step with every other rank."""
        it = iter(self.batches())
        while True:
            batch = next(it, None)
            if not any_true(batch is not None):
                return
            if batch is None:
                yield self.to_device(self.dummy_batch()), False
            else:
                self.bad_samples += sum(batch.pop("_bad", {}).values())
                yield self.to_device(batch), True

    @torch.no_grad()
    def features(self) -> dict[str, torch.Tensor]:
        """All ranks' held-out ``image``/``text`` features (N, D) float32 and ``label`` (N,), gathered."""
        if self._features is not None:
            return self._features
        image, text, label = [], [], []
        for batch, real in self.iterate():
            image_f = self.model.encode_image(batch["image"]).float().cpu()
            text_f = None
            if "input_ids" in batch:
                text_f = self.model.encode_text(batch["input_ids"], batch["attention_mask"]).float().cpu()
            if real:
                image.append(image_f)
                label.append(batch["label"].cpu())
                if text_f is not None:
                    text.append(text_f)
        dim = self.model.cfg.embed_dim
        out = {
            "image": all_gather_tensor(torch.cat(image) if image else torch.zeros(0, dim)),
            "label": all_gather_tensor(torch.cat(label) if label else torch.zeros(0, dtype=torch.long)),
        }
        if text or not image:
            out["text"] = all_gather_tensor(torch.cat(text) if text else torch.zeros(0, dim))
        self._features = out
        return out


class _TextEncoderAdapter:
    """Lets open_clip's zero-shot builder call our encode_text with a tokenizer's dict output."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def encode_text(self, tokens, normalize: bool = True) -> torch.Tensor:
        return self.model.encode_text(tokens["input_ids"], tokens["attention_mask"], normalize=normalize).float()


class _BatchTokens(dict):
    def to(self, device):
        return _BatchTokens({k: v.to(device) for k, v in self.items()})


def zeroshot_classifier(
    model: torch.nn.Module, tokenize: Callable, classnames: list[str], templates: list[str], device: torch.device
) -> torch.Tensor:
    """(D, C) class embeddings: each class's templates encoded, averaged, normalised (open_clip's builder)."""
    from open_clip import build_zero_shot_classifier

    templates = [t.replace("{c}", "{}") for t in templates]
    with torch.no_grad():
        return build_zero_shot_classifier(
            _TextEncoderAdapter(model),
            lambda texts: _BatchTokens(tokenize(texts)),
            classnames,
            templates,
            num_classes_per_batch=10,
            device=device,
        ).float()


@EVALUATORS.register("zeroshot")
def evaluate_zeroshot(ctx: EvalContext) -> dict[str, float]:
    """Zero-shot classification of held-out images: acc1, acc5, mean_per_class_recall."""
    if not ctx.classnames or not ctx.templates:
        raise ConfigError("eval: zeroshot needs class names and templates (eval.classnames / eval.templates)")
    classifier = zeroshot_classifier(ctx.model, ctx.tokenize, ctx.classnames, ctx.templates, ctx.device).cpu()
    feats = ctx.features()
    keep = feats["label"] >= 0
    if not keep.any():
        raise ConfigError("eval: zeroshot needs labels in the held-out shards' json ('label')")
    labels = feats["label"][keep]
    if int(labels.max()) >= len(ctx.classnames):
        raise ConfigError(f"eval: label {int(labels.max())} is outside the {len(ctx.classnames)} class names")
    logits = feats["image"][keep] @ classifier
    return {**classification_metrics(logits, labels), "n": float(keep.sum())}


@EVALUATORS.register("retrieval")
def evaluate_retrieval(ctx: EvalContext) -> dict[str, float]:
    """Image↔text recall@1/5/10 over the held-out (image, caption) pairs."""
    feats = ctx.features()
    if "text" not in feats or feats["text"].shape[0] != feats["image"].shape[0]:
        raise ConfigError("eval: retrieval needs a caption for every held-out image")
    return retrieval_metrics(feats["image"], feats["text"])


def run_evaluators(names: list[str], ctx: EvalContext) -> dict[str, float]:
    out: dict[str, float] = {}
    for name in names:
        if name not in EVALUATORS:
            raise ConfigError(f"config: unknown evaluator '{name}'; registered: {', '.join(EVALUATORS.list())}")
        for key, value in EVALUATORS.get(name)(ctx).items():
            out[f"{name}/{key}"] = value
    return out


import mm_ptft.eval.probe  # noqa: E402, F401 - registers classification(_hflip), linear_probe
import mm_ptft.finetune.detection.evaluator  # noqa: E402, F401 - registers coco
