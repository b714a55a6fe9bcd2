"""Text tower → a transformers directory: ``save_pretrained`` of the encoder and its tokenizer, plus the head.

Loads with ``AutoModel.from_pretrained(dir)`` / ``AutoTokenizer.from_pretrained(dir)``. What turns token states into
the joint embedding sits beside them: ``projection.safetensors`` (keys of :func:`mm_ptft.models.heads.build_projection`)
and ``mm_ptft_text.json`` (pooling, context length, projection kind, embedding width).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from mm_ptft.checkpoint import save_weights
from mm_ptft.export.source import EXAMPLE_TEXTS, ExportError, ExportSource, check_close
from mm_ptft.export.target import ExportTarget, register_target


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' progress bars and load report (e.g. BERT's unused pooler 'newly initialized')."""
    from transformers.utils import logging

    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def head_config(src: ExportSource) -> dict:
    text = src.cfg.model.text
    tower = src.text_tower("transformers")
    return {
        "pool": text.pool,  # 'cls': token 0; 'mean': mask-weighted mean; 'last': last non-pad token
        "context_length": text.context_length,  # pad / truncate to this many tokens
        "proj": text.proj,
        "proj_bias": text.proj_bias,
        "width": tower.width,
        "embed_dim": src.cfg.model.embed_dim,
        "normalize": True,  # the joint embedding is L2-normalised
        "source": str(src.path),
        "task": src.cfg.task,
    }


def export_transformers(src: ExportSource, out: Path, verify: bool = True) -> dict:
    """Write the text tower (encoder + tokenizer + projection) under ``out``; returns what was written and checked.

    Raises:
        ExportError: the checkpoint has no text tower, or the reloaded encoder does not reproduce the tower.
    """
    tower = src.text_tower("transformers")
    tokenizer = src.tokenizer()
    out.mkdir(parents=True, exist_ok=True)
    with quiet_transformers():
        tower.transformer.save_pretrained(out)
        tokenizer.save_pretrained(out)
    files = sorted(p.name for p in out.iterdir())
    if any(True for _ in tower.proj.parameters()):
        save_weights(tower.proj.state_dict(), out / "projection.safetensors", {"format": "pt"})
        files.append("projection.safetensors")
    (out / "mm_ptft_text.json").write_text(json.dumps(head_config(src), indent=2) + "\n")
    files.append("mm_ptft_text.json")
    info: dict = {"files": files, "model_type": tower.transformer.config.model_type}
    if verify:
        info.update(_verify(src, out))
    return info


def _verify(src: ExportSource, out: Path) -> dict:
    from transformers import AutoModel, AutoTokenizer

    tower = src.text_tower("transformers")
    try:
        with quiet_transformers():
            model = AutoModel.from_pretrained(out, local_files_only=True).eval()
            tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise ExportError(
            f"export: transformers cannot load the exported text tower: {str(e).splitlines()[0]}"
        ) from None
    from mm_ptft.models import tokenize

    ours = src.tokenize(EXAMPLE_TEXTS)
    theirs = tokenize(tokenizer, EXAMPLE_TEXTS, src.cfg.model.text.context_length)
    if not torch.equal(ours["input_ids"], theirs["input_ids"]):
        raise ExportError("export: the saved tokenizer tokenizes differently from the model's tokenizer")
    with torch.no_grad():
        states = model(**theirs).last_hidden_state
        pooled = tower.pool(states, theirs["attention_mask"])
        return {"max_abs_diff": check_close("transformers text features", tower.forward_pooled(**ours), pooled)}


@register_target
class TransformersTarget(ExportTarget):
    """The text tower as a transformers ``save_pretrained`` directory (+ tokenizer and projection)."""

    name = "transformers"
    tower = "text"

    def export(self, src: ExportSource, work: Path, final: Path, verify: bool, opset: int | None) -> dict:
        return export_transformers(src, work, verify)
