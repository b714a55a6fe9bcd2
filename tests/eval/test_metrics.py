"""Evaluation metrics against independent computations (sklearn / numpy)."""

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, top_k_accuracy_score

from mm_ptft.eval.metrics import classification_metrics, retrieval_metrics


def test_classification_metrics_match_sklearn():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 10, generator=g)
    labels = torch.randint(0, 10, (300,), generator=g)
    labels[:20] = logits[:20].argmax(1)  # some hits
    got = classification_metrics(logits, labels)
    y, s = labels.numpy(), logits.numpy()
    assert got["acc1"] == pytest.approx(top_k_accuracy_score(y, s, k=1, labels=range(10)))
    assert got["acc5"] == pytest.approx(top_k_accuracy_score(y, s, k=5, labels=range(10)))
    assert got["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(y, s.argmax(1)))


def _naive_recall(queries, keys, k):
    scores = queries @ keys.T
    hits = [i in np.argsort(-scores[i])[:k] for i in range(len(queries))]
    return float(np.mean(hits))


def test_retrieval_recall_matches_numpy_ranking():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(257, 8)).astype(np.float32)
    text = image + rng.normal(scale=1.5, size=image.shape).astype(np.float32)
    got = retrieval_metrics(torch.from_numpy(image), torch.from_numpy(text), ks=(1, 5, 10), chunk=64)
    for k in (1, 5, 10):
        assert got[f"image_retrieval_recall@{k}"] == pytest.approx(_naive_recall(text, image, k))
        assert got[f"text_retrieval_recall@{k}"] == pytest.approx(_naive_recall(image, text, k))


def test_retrieval_ties_count_as_random_order():
    # every caption identical: each image's text is tied with all N texts → expected recall@k = k / N
    image = torch.nn.functional.normalize(torch.randn(20, 4), dim=-1)
    text = torch.ones(20, 4) / 2
    got = retrieval_metrics(image, text, ks=(1, 5))
    assert got["text_retrieval_recall@1"] == pytest.approx(1 / 20)
    assert got["text_retrieval_recall@5"] == pytest.approx(5 / 20)
