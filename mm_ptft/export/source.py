"""What an export reads: a trained model's config and fp32 weights, and the towers rebuilt from them.

A source is anything :func:`mm_ptft.checkpoint.load_weights` reads — a run directory, a checkpoint tag directory of
any ZeRO stage (consolidated to fp32 on the fly), or a ``.safetensors`` / weights-only ``.pt`` state — with the run's
``config.yaml`` beside it (or a config given explicitly). Pretraining checkpoints hold the whole dual encoder;
fine-tuning checkpoints hold one tower (``image.*`` or ``text.*``) plus a task head, and export what they hold.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mm_ptft import checkpoint as ckpt
from mm_ptft.config import Config, ConfigError


class ExportError(RuntimeError):
    """An export that cannot be made as asked: an unknown target, a tower the checkpoint lacks, a format that cannot
    represent the model, or an output that does not reproduce the model."""


DUAL_ENCODER_KEYS = ("image.", "text.", "logit_scale", "logit_bias")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def read_weights(source: str | Path) -> dict[str, torch.Tensor]:
    """fp32 weights of ``source``; any unreadable file (truncated, not a checkpoint) is a one-line CheckpointError."""
    from mm_ptft.distributed.engine import UnsafeCheckpointError

    try:
        return ckpt.load_weights(source)
    except (ckpt.CheckpointError, ConfigError, UnsafeCheckpointError):
        raise
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, IndexError, StopIteration) as e:
        # DeepSpeed's readers fail in many ways on a truncated or foreign file; none of them is actionable as a trace
        raise ckpt.CheckpointError(f"checkpoint: cannot read {source}: {_first_line(e)}") from None


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().float() - b.detach().float()).abs().max().item()


def check_close(what: str, ours: torch.Tensor, theirs: torch.Tensor, tol: float = 1e-4) -> float:
    """The largest absolute difference; an ExportError when it exceeds ``tol`` × the outputs' scale (at least 1)."""
    if tuple(ours.shape) != tuple(theirs.shape):
        raise ExportError(f"export: {what} has shape {tuple(theirs.shape)}, the model gives {tuple(ours.shape)}")
    diff = max_abs_diff(ours, theirs)
    scale = max(1.0, ours.detach().float().abs().max().item())
    if not diff <= tol * scale:
        raise ExportError(f"export: {what} differs from the model's output by {diff:.3g} (allowed {tol * scale:.3g})")
    return diff


@dataclass
class ExportSource:
    """A trained model to export: where it came from, its config and its fp32 weights (names relative to the model).

    Towers are built on first use, in eval mode, with the checkpoint's weights loaded strictly.
    """

    path: Path
    cfg: Config
    state: dict[str, torch.Tensor]
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def has_image(self) -> bool:
        return any(k.startswith("image.") for k in self.state)

    @property
    def has_text(self) -> bool:
        return any(k.startswith("text.") for k in self.state)

    @property
    def has_dual_encoder(self) -> bool:
        return self.has_image and self.has_text and "logit_scale" in self.state

    def _missing(self, what: str, target: str) -> ExportError:
        held = [n for n, ok in (("image", self.has_image), ("text", self.has_text)) if ok]
        holds = f"only the {held[0]} tower" if len(held) == 1 else "no tower weights ('image.*' / 'text.*')"
        return ExportError(f"export: {target} needs {what}; {self.path} (task '{self.cfg.task}') holds {holds}")

    def dual_encoder(self, target: str = "this target") -> nn.Module:
        """The whole two-tower model (pretraining checkpoints)."""
        if not self.has_dual_encoder:
            raise self._missing("both towers and the logit scale", target)
        if "dual" not in self._cache:
            from mm_ptft.models import create_model

            model = create_model(self.cfg.model)
            state = {k: v for k, v in self.state.items() if k.startswith(DUAL_ENCODER_KEYS)}
            ckpt.load_model_weights(model, state, what=str(self.path))
            self._cache["dual"] = model.eval()
        return self._cache["dual"]

    def image_tower(self, target: str = "this target") -> nn.Module:
        """The image tower (an :class:`mm_ptft.models.ImageTower`) with the checkpoint's ``image.*`` weights."""
        if not self.has_image:
            raise self._missing("the image tower", target)
        if self.has_dual_encoder:
            return self.dual_encoder(target).image
        if "image" not in self._cache:
            from mm_ptft.models import ImageTower, use_fused_attn

            model_cfg = self.cfg.model
            tower = ImageTower(model_cfg.image, model_cfg.embed_dim, fused_attn=use_fused_attn(model_cfg))
            self._cache["image"] = self._load_tower(tower, "image.")
        return self._cache["image"]

    def text_tower(self, target: str = "this target") -> nn.Module:
        """The text tower (an :class:`mm_ptft.models.TextTower`) with the checkpoint's ``text.*`` weights."""
        if not self.has_text:
            raise self._missing("the text tower", target)
        if self.has_dual_encoder:
            return self.dual_encoder(target).text
        if "text" not in self._cache:
            from mm_ptft.models import TextTower

            self._cache["text"] = self._load_tower(TextTower(self.cfg.model.text, self.cfg.model.embed_dim), "text.")
        return self._cache["text"]

    def _load_tower(self, tower: nn.Module, prefix: str) -> nn.Module:
        state = {k[len(prefix) :]: v for k, v in self.state.items() if k.startswith(prefix)}
        ckpt.load_model_weights(tower, state, what=f"{self.path} ({prefix.rstrip('.')} tower)")
        return tower.eval()

    def tokenizer(self):
        """The text tower's tokenizer (a transformers fast tokenizer, from a local path or alias)."""
        if "tokenizer" not in self._cache:
            from mm_ptft.models import create_tokenizer

            self._cache["tokenizer"] = create_tokenizer(self.cfg.model.text)
        return self._cache["tokenizer"]

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        from mm_ptft.models import tokenize

        return tokenize(self.tokenizer(), texts, self.cfg.model.text.context_length)

    @functools.cached_property
    def norm_stats(self) -> tuple[list[float], list[float]]:
        """Image normalisation (mean, std) the model was trained with."""
        from mm_ptft.data.stats import image_norm_stats

        return image_norm_stats(self.cfg)

    def example_images(self, batch: int = 2, seed: int = 0) -> torch.Tensor:
        """Deterministic normalised-scale inputs (B, C, H, W) for parity checks."""
        image = self.cfg.model.image
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(batch, image.in_chans, image.image_size, image.image_size, generator=generator)


EXAMPLE_TEXTS = ["a photo of a t-shirt.", "an ankle boot, seen from the side", "", "Sneaker!"]


def load_source(source: str | Path, cfg: Config | None = None, overrides: list[str] | None = None) -> ExportSource:
    """Read a trained model for export.

    Args:
        source: run directory, checkpoint tag directory (any ZeRO stage), or a ``.safetensors`` / ``.pt`` state.
        cfg: the model's config; None reads the ``config.yaml`` saved beside the weights.
        overrides: dotted overrides applied to the saved config (ignored when ``cfg`` is given).

    Raises:
        CheckpointError: a missing, truncated or unsafe checkpoint.
        ConfigError: no config beside the weights and none given.
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise ckpt.CheckpointError(f"checkpoint: {path} does not exist")
    cfg = copy.deepcopy(cfg if cfg is not None else ckpt.saved_config(path, overrides))
    # the checkpoint replaces every weight: never read (or require) the file the image tower was initialised from
    cfg.model.image.pretrained = None
    return ExportSource(path, cfg, read_weights(path))
