"""Metric functions on features and logits (pure, single-device; names follow CLIP_benchmark)."""

from __future__ import annotations

import torch


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """``acc{k}``: fraction of rows whose label is among the k largest logits. logits (N, C), labels (N,)."""
    out = {}
    n_classes = logits.shape[1]
    order = logits.topk(min(max(ks), n_classes), dim=1).indices  # (N, kmax)
    hits = order == labels[:, None]
    for k in ks:
        if k <= n_classes:
            out[f"acc{k}"] = hits[:, :k].any(dim=1).float().mean().item()
    return out


def mean_per_class_recall(predictions: torch.Tensor, labels: torch.Tensor, n_classes: int) -> float:
    """Balanced accuracy: the mean over classes present in ``labels`` of the fraction predicted correctly."""
    recalls = []
    for c in range(n_classes):
        mask = labels == c
        if mask.any():
            recalls.append((predictions[mask] == c).float().mean().item())
    return float(sum(recalls) / len(recalls)) if recalls else 0.0


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """acc1, acc5 (when there are ≥ 5 classes) and mean_per_class_recall."""
    logits, labels = logits.float(), labels.long()
    out = topk_accuracy(logits, labels)
    out["mean_per_class_recall"] = mean_per_class_recall(logits.argmax(1), labels, logits.shape[1])
    return out


def retrieval_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    ks: tuple[int, ...] = (1, 5, 10),
    chunk: int = 2048,
) -> dict[str, float]:
    """Recall@k for paired (image_i, text_i) features, as CLIP_benchmark defines it.

    ``image_retrieval_recall@k``: for each text, its image is among the k most similar images.
    ``text_retrieval_recall@k``: for each image, its text is among the k most similar texts.
    Computed in row chunks so N × N similarities never sit in memory at once. Keys scoring exactly as the positive
    (duplicated captions) are ordered at random: the recall reported is its expectation under that random order,
    so duplicates neither inflate nor deflate it.
    """
    image_features, text_features = image_features.float(), text_features.float()
    n = image_features.shape[0]
    out = {}
    for name, queries, keys in (
        ("image_retrieval", text_features, image_features),
        ("text_retrieval", image_features, text_features),
    ):
        ahead = torch.empty(n)  # keys scoring strictly higher than the positive
        ties = torch.empty(n)  # other keys scoring the same
        for start in range(0, n, chunk):
            scores = queries[start : start + chunk] @ keys.T  # (c, N)
            idx = torch.arange(start, min(start + chunk, n))
            positive = scores[torch.arange(len(idx)), idx][:, None]  # (c, 1)
            ahead[idx] = (scores > positive).sum(dim=1).float()
            ties[idx] = (scores == positive).sum(dim=1).float() - 1
        for k in ks:
            # rank = ahead + U, U uniform on {0 … ties}: P(rank < k) = clamp((k - ahead) / (ties + 1), 0, 1)
            out[f"{name}_recall@{k}"] = ((k - ahead) / (ties + 1)).clamp(0, 1).mean().item()
    return out
