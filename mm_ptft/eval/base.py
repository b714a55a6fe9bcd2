"""The evaluator registry, what evaluators may ask of a task, and the context they share.

An evaluator is a function ``fn(ctx: EvalContext) -> dict[str, float]`` registered with :func:`register_evaluator`,
which also declares what the task must provide (``needs``: the Protocols below) and, optionally, a settings
dataclass read from ``eval.settings.<name>``. Metric names follow CLIP_benchmark and are prefixed with the
evaluator's name in logs (``zeroshot/acc1``). A new evaluator is one decorated function in a module its package
imports; nothing else to edit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from mm_ptft.config import ConfigError, config_from_dict
from mm_ptft.distributed import all_gather_tensor, any_true
from mm_ptft.registry import Registry

# ---------------------------------------------------------------------------------------------------------------------
# What an evaluator can need from a task (tasks satisfy these by their methods; nothing is registered)
# ---------------------------------------------------------------------------------------------------------------------


@runtime_checkable
class ImageTextEncoder(Protocol):
    """Embeds images and texts into one space (the dual encoder of contrastive pretraining)."""

    def encode_image(self, image: torch.Tensor) -> torch.Tensor: ...  # (B, C, H, W) → (B, D), L2-normalised

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor: ...


@runtime_checkable
class Classifier(Protocol):
    """Scores a batch over ``num_classes`` classes."""

    num_classes: int

    def logits(self, batch: dict) -> torch.Tensor: ...  # (B, num_classes) float32


@runtime_checkable
class ImageClassifier(Classifier, Protocol):
    """A classifier of images, callable on image tensors alone (test-time augmentation)."""

    def image_logits(self, image: torch.Tensor) -> torch.Tensor: ...  # (B, C, H, W) → (B, num_classes)


@runtime_checkable
class FeatureExtractor(Protocol):
    """Gives the features a linear probe of the model sees."""

    def features(self, batch: dict) -> torch.Tensor: ...  # (B, F) float32


@runtime_checkable
class Detector(Protocol):
    """Predicts boxes; model labels 1..K are the positions (+1) of ``categories`` (``[{"id", "name"}]``)."""

    categories: list[dict]

    def predict(self, batch: dict) -> list[dict[str, torch.Tensor]]: ...


# ---------------------------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Evaluator:
    """A registered evaluator: its function, what it needs and its settings type."""

    name: str
    fn: Callable[[EvalContext], dict[str, float]]
    needs: tuple[type, ...] = ()  # Protocols the task must satisfy
    settings: type | None = None  # dataclass of eval.settings.<name>
    train_split: bool = False  # reads a second split of eval.data (``ctx.train_batches``), e.g. the linear probe

    def __call__(self, ctx: EvalContext) -> dict[str, float]:
        return self.fn(ctx)


EVALUATORS: Registry[Evaluator] = Registry("evaluator")


def register_evaluator(
    name: str, needs: tuple[type, ...] = (), settings: type | None = None, train_split: bool = False
) -> Callable[[Callable[[EvalContext], dict[str, float]]], Callable[[EvalContext], dict[str, float]]]:
    """Decorator: register ``fn(ctx) -> metrics`` as evaluator ``name``; returns ``fn`` unchanged."""

    def decorator(fn):
        EVALUATORS.register(name)(Evaluator(name, fn, tuple(needs), settings, train_split))
        return fn

    return decorator


def get_evaluator(name: str) -> Evaluator:
    if name not in EVALUATORS:
        raise ConfigError(f"config: unknown evaluator '{name}'; registered: {', '.join(EVALUATORS.list())}")
    return EVALUATORS.get(name)


def evaluator_settings(settings: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``eval.settings`` (plain mappings) → each evaluator's typed settings, unknown names and keys refused."""
    out: dict[str, Any] = {}
    for name, values in settings.items():
        evaluator = get_evaluator(name)
        if evaluator.settings is None:
            raise ConfigError(f"config: evaluator '{name}' takes no settings (eval.settings.{name})")
        if not isinstance(values, dict):
            raise ConfigError(f"config: eval.settings.{name} must be a mapping, got {values!r}")
        out[name] = config_from_dict(values, evaluator.settings, prefix=f"eval.settings.{name}")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Context
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class EvalContext:
    """What evaluators share: the task, a tokenizer, held-out batches, class names, settings; features are cached.

    ``batches`` (and ``train_batches``) are callables returning a fresh iterable of this rank's batches. Every rank
    must run the same number of forward passes (ZeRO-3 gathers parameters collectively), so :meth:`iterate` keeps
    ranks in lock-step and hands ``dummy_batch()`` (flagged not real) to a rank whose data ran out first.
    """

    task: Any
    tokenize: Callable[[list[str]], dict] | None
    batches: Callable[[], Iterable[dict]]
    dummy_batch: Callable[[], dict]
    device: torch.device
    classnames: list[str] | None = None
    templates: list[str] | None = None
    train_batches: Callable[[], Iterable[dict]] | None = None  # the train split of eval.data (linear probe)
    settings: dict[str, Any] = field(default_factory=dict)  # evaluator name → its settings dataclass
    out_dir: Path | None = None  # the run directory, where evaluators may write figures (None: write none)
    images: dict[str, Path] = field(default_factory=dict)  # figures written, caption → path (for the run report)
    bad_samples: int = 0
    _features: dict | None = field(default=None, repr=False)

    def setting(self, name: str) -> Any:
        """Evaluator ``name``'s settings: ``eval.settings.<name>``, else its dataclass defaults."""
        if name not in self.settings:
            self.settings[name] = EVALUATORS.get(name).settings()
        return self.settings[name]

    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def iterate(self, batches: Callable[[], Iterable[dict]] | None = None) -> Iterator[tuple[dict, bool]]:
        """This rank's batches (default: the held-out split) as ``(batch on device, is_real)``, in lock-step with
        every other rank."""
        it = iter((batches or self.batches)())
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
        """All ranks' held-out ``image``/``text`` embeddings (N, D) float32 and ``label`` (N,), gathered
        (an :class:`ImageTextEncoder` task)."""
        if self._features is not None:
            return self._features
        image, text, label = [], [], []
        width = 0
        for batch, real in self.iterate():
            image_f = self.task.encode_image(batch["image"]).float().cpu()
            width = image_f.shape[1]
            text_f = None
            if "input_ids" in batch:
                text_f = self.task.encode_text(batch["input_ids"], batch["attention_mask"]).float().cpu()
            if real:
                image.append(image_f)
                label.append(batch["label"].cpu())
                if text_f is not None:
                    text.append(text_f)
        out = {
            "image": all_gather_tensor(torch.cat(image) if image else torch.zeros(0, width)),
            "label": all_gather_tensor(torch.cat(label) if label else torch.zeros(0, dtype=torch.long)),
        }
        if text or not image:
            out["text"] = all_gather_tensor(torch.cat(text) if text else torch.zeros(0, width))
        self._features = out
        return out


def _requirement(need: type) -> str:
    members = [m for m in vars(need) if not m.startswith("_")] + list(getattr(need, "__annotations__", {}))
    return f"{need.__name__} ({', '.join(dict.fromkeys(members))})"


def run_evaluators(names: list[str], ctx: EvalContext) -> dict[str, float]:
    """Run each named evaluator on ``ctx``; metrics come back as ``<evaluator>/<metric>``.

    Raises:
        ConfigError: an unknown evaluator, or one whose needs the task does not meet (one line, naming both).
    """
    out: dict[str, float] = {}
    for name in names:
        evaluator = get_evaluator(name)
        for need in evaluator.needs:
            if not isinstance(ctx.task, need):
                raise ConfigError(
                    f"eval: evaluator '{name}' needs a task that is a {_requirement(need)}; "
                    f"{type(ctx.task).__name__} is not"
                )
        if evaluator.train_split and ctx.train_batches is None:
            raise ConfigError(f"eval: evaluator '{name}' needs the train split of eval.data, and there is none")
        for key, value in evaluator(ctx).items():
            out[f"{name}/{key}"] = value
    return out
