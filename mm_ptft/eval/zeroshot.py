"""Zero-shot classification and image↔text retrieval of a dual encoder on held-out image-caption pairs."""

from __future__ import annotations

from mm_ptft.config import ConfigError
from mm_ptft.data.classes import check_labels
from mm_ptft.eval.base import EvalContext, ImageTextEncoder, register_evaluator
from mm_ptft.eval.metrics import classification_metrics, retrieval_metrics
from mm_ptft.models.zeroshot import zeroshot_classifier


@register_evaluator("zeroshot", needs=(ImageTextEncoder,))
def evaluate_zeroshot(ctx: EvalContext) -> dict[str, float]:
    """Zero-shot classification of held-out images: acc1, acc5, mean_per_class_recall (and the count ``n``)."""
    if not ctx.classnames or not ctx.templates:
        raise ConfigError("eval: zeroshot needs class names and templates (eval.classnames / eval.templates)")
    if ctx.tokenize is None:
        raise ConfigError("eval: zeroshot needs the text tower's tokenizer (model.text.tokenizer)")
    classifier = zeroshot_classifier(ctx.task, ctx.tokenize, ctx.classnames, ctx.templates, ctx.device).cpu()
    feats = ctx.features()
    keep = feats["label"] >= 0  # samples without a label (json 'label') take no part
    if not keep.any():
        raise ConfigError("eval: zeroshot needs labels in the held-out shards' json ('label')")
    labels = feats["label"][keep]
    check_labels(labels, len(ctx.classnames), "held-out")
    logits = feats["image"][keep] @ classifier
    return {**classification_metrics(logits, labels), "n": float(labels.numel())}


@register_evaluator("retrieval", needs=(ImageTextEncoder,))
def evaluate_retrieval(ctx: EvalContext) -> dict[str, float]:
    """Image↔text recall@1/5/10 over the held-out (image, caption) pairs."""
    feats = ctx.features()
    if "text" not in feats or feats["text"].shape[0] != feats["image"].shape[0]:
        raise ConfigError("eval: retrieval needs a caption for every held-out image")
    return retrieval_metrics(feats["image"], feats["text"])
