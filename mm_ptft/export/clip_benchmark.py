"""CLIP_benchmark on any mm-ptft model: a ``mm_ptft`` model type in its loader table, then its own CLI, unchanged.

    mm-ptft clip-benchmark eval --model_type mm_ptft --model runs/pretrain-fmnist --pretrained fmnist \\
        --dataset wds/fmnist --dataset_root data/fmnist-cb --task zeroshot_classification --no_amp \\
        --output cb_fmnist.json

``--model`` is anything ``mm-ptft eval --model`` takes (run dir, checkpoint dir of any ZeRO stage, weights file with
its config.yaml beside). ``--pretrained`` is a free label used in CLIP_benchmark's output file name, or a YAML config
to use instead of the saved one. ``--model_type mm_ptft`` and ``--pretrained mm_ptft`` are added when not given.
Unlike the open_clip export, this works for every mm-ptft dual encoder (any timm / transformers towers, any image
size or number of channels).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

MODEL_TYPE = "mm_ptft"


class _Tokens(dict):
    """A tokenizer's dict output that CLIP_benchmark can move with ``.to(device)``."""

    def to(self, device):
        return _Tokens({k: v.to(device) for k, v in self.items()})


class CLIPBenchmarkModel(nn.Module):
    """The dual encoder behind CLIP_benchmark's model interface (it normalises features itself)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(image, normalize=False)

    def encode_text(self, tokens: dict) -> torch.Tensor:
        return self.model.encode_text(tokens["input_ids"], tokens["attention_mask"], normalize=False)


def load_mm_ptft(model_name: str, pretrained: str | None = None, cache_dir: str | None = None, device="cpu"):
    """CLIP_benchmark loader: ``(model, transform, tokenizer)`` for an mm-ptft checkpoint.

    Args:
        model_name: run dir, checkpoint dir or weights file (config.yaml beside it).
        pretrained: a label, or a YAML config file to use instead of the saved one.
        cache_dir: unused (nothing is downloaded).
        device: where the model runs.
    """
    from mm_ptft.config import load_config
    from mm_ptft.data import create_transform
    from mm_ptft.export.source import load_source

    cfg = None
    if pretrained and Path(pretrained).suffix in (".yaml", ".yml") and Path(pretrained).is_file():
        cfg = load_config(pretrained)
    src = load_source(model_name, cfg)
    model = CLIPBenchmarkModel(src.dual_encoder("CLIP_benchmark")).to(device).eval()
    mean, std = src.norm_stats
    image = src.cfg.model.image
    transform = create_transform(src.cfg.data.image, image.image_size, image.in_chans, mean, std, train=False)

    def tokenizer(texts: str | list[str]) -> _Tokens:
        return _Tokens(src.tokenize([texts] if isinstance(texts, str) else list(texts)))

    return model, transform, tokenizer


def register() -> None:
    """Add the ``mm_ptft`` model type to CLIP_benchmark's loader table (idempotent)."""
    from clip_benchmark import models

    models.TYPE2FUNC[MODEL_TYPE] = load_mm_ptft
    if MODEL_TYPE not in models.MODEL_TYPES:
        models.MODEL_TYPES.append(MODEL_TYPE)  # the same list object the CLI's --model_type choices read
