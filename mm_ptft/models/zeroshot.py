"""Zero-shot classifier weights from a text encoder: each class's prompts encoded, averaged and normalised.

Single-device code, used to score zero-shot classification and to start a fine-tuned image classifier's head at the
zero-shot classifier (WiSE-FT's setting). It wraps open_clip's builder, which expects open_clip's model and
tokenizer calling conventions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class _TextEncoderAdapter:
    """Lets open_clip's builder call our ``encode_text(input_ids, attention_mask)`` with a tokenizer's dict."""

    def __init__(self, encoder):
        self.encoder = encoder

    def encode_text(self, tokens, normalize: bool = True) -> torch.Tensor:
        return self.encoder.encode_text(tokens["input_ids"], tokens["attention_mask"], normalize=normalize).float()


class _BatchTokens(dict):
    def to(self, device):
        return _BatchTokens({k: v.to(device) for k, v in self.items()})


def zeroshot_classifier(
    encoder, tokenize: Callable[[list[str]], dict], classnames: list[str], templates: list[str], device: torch.device
) -> torch.Tensor:
    """(D, C) float32 class embeddings (open_clip's ``build_zero_shot_classifier``).

    Args:
        encoder: anything with ``encode_text(input_ids, attention_mask, normalize=True)`` (the dual encoder, or a
            task wrapping one).
        tokenize: texts → ``{"input_ids", "attention_mask"}``.
        classnames: C class names.
        templates: prompts with ``{}`` (or ``{c}``) where the class name goes.
        device: where the text tower runs.
    """
    from open_clip import build_zero_shot_classifier

    templates = [t.replace("{c}", "{}") for t in templates]
    with torch.no_grad():
        return build_zero_shot_classifier(
            _TextEncoderAdapter(encoder),
            lambda texts: _BatchTokens(tokenize(texts)),
            classnames,
            templates,
            num_classes_per_batch=10,
            device=device,
        ).float()
