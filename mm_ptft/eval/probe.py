"""Evaluators of classifiers and of frozen features: ``classification(_hflip)`` and ``linear_probe``.

``classification`` runs a classifier task (image or text) on the held-out split: acc1, acc5, mean_per_class_recall
and the cross-entropy ``loss``; ``classification_hflip`` reports the same with test-time flips (class probabilities
of each image and its mirror image averaged). ``linear_probe`` fits an L2-regularised multinomial logistic
regression on frozen features of the train split of ``eval.data`` (L-BFGS, the objective of sklearn's
``LogisticRegression``; its ``C`` picked on a held-out fifth of the train features) and reports CLIP_benchmark's
``lp_acc1``, ``lp_acc5`` and ``lp_mean_per_class_recall`` on the held-out split. All of them run during training
(every rank scores its share, the results are gathered) as well as in ``mm-ptft eval``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mm_ptft.data import DataError
from mm_ptft.data.classes import check_labels
from mm_ptft.distributed import all_gather_tensor
from mm_ptft.eval.base import Classifier, EvalContext, FeatureExtractor, ImageClassifier, register_evaluator
from mm_ptft.eval.metrics import classification_metrics

C_GRID = tuple(10.0**e for e in range(-2, 7))  # inverse regularisation strengths tried by the probe (sklearn's C)


@register_evaluator("classification", needs=(Classifier,))
@torch.no_grad()
def evaluate_classification(ctx: EvalContext) -> dict[str, float]:
    """A classifier task's held-out acc1, acc5, mean_per_class_recall and cross-entropy loss."""
    return _evaluate_classifier(ctx, lambda task, batch: task.logits(batch).float())


@register_evaluator("classification_hflip", needs=(ImageClassifier,))
@torch.no_grad()
def evaluate_classification_hflip(ctx: EvalContext) -> dict[str, float]:
    """The same metrics with test-time flips: each image's class probabilities averaged with its mirror image's
    (two forward passes). Meaningful where a horizontal flip keeps the label (as ``data.image.hflip`` assumes)."""

    def log_probs(task, batch: dict) -> torch.Tensor:
        image = batch["image"]
        probs = task.image_logits(image).float().softmax(-1) + task.image_logits(image.flip(-1)).float().softmax(-1)
        return (probs / 2).log()  # log of the averaged probabilities: ranks as the probabilities, NLL is their loss

    return _evaluate_classifier(ctx, log_probs)


def _evaluate_classifier(ctx: EvalContext, scores: Callable[[Classifier, dict], torch.Tensor]) -> dict[str, float]:
    task = ctx.task
    logits, labels = [], []
    for batch, real in ctx.iterate():
        out = scores(task, batch).cpu()
        if real:
            logits.append(out)
            labels.append(batch["label"].cpu())
    logits = all_gather_tensor(torch.cat(logits) if logits else torch.zeros(0, task.num_classes))
    labels = all_gather_tensor(torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long))
    if labels.numel() == 0:
        raise DataError("data: the held-out split has no samples")
    check_labels(labels, task.num_classes, "held-out")
    metrics = classification_metrics(logits, labels)
    metrics["loss"] = F.cross_entropy(logits, labels).item()  # = NLL for log-probabilities (they are normalised)
    return {**metrics, "n": float(labels.numel())}


# ---------------------------------------------------------------------------------------------------------------------
# Linear probe
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class LinearProbeSettings:
    train_split: str = "train"  # split of eval.data whose features the probe is fitted on
    max_train_samples: int | None = None  # cap on those samples (None: the whole split)
    max_iter: int = 500  # L-BFGS iterations per fit


@torch.no_grad()
def extract_features(ctx: EvalContext, batches: Callable[[], Iterable[dict]] | None = None):
    """All ranks' (features (N, F) float32, labels (N,)) of ``batches`` (default: the held-out split), gathered."""
    feats, labels, width = [], [], 0
    for batch, real in ctx.iterate(batches):
        out = ctx.task.features(batch).float().cpu()
        width = out.shape[1]
        if real:
            feats.append(out)
            labels.append(batch["label"].cpu())
    width = int(all_gather_tensor(torch.tensor([width])).max())
    x = all_gather_tensor(torch.cat(feats) if feats else torch.zeros(0, width))
    y = all_gather_tensor(torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long))
    return x, y


def fit_logistic_regression(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, c: float = 1.0, max_iter: int = 500
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression by L-BFGS, minimising sklearn's ``LogisticRegression(C=c)`` objective
    ``C · Σ_i CE_i + ½‖W‖²`` (intercept not penalised). Returns (W (F, C), b (C,)) in float64.

    Args:
        x: (N, F) features.
        y: (N,) labels in [0, num_classes).
        num_classes: C.
        c: inverse regularisation strength.
        max_iter: L-BFGS iterations.
    """
    x, y = x.double(), y.long()
    w = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12, history_size=20,
        line_search_fn="strong_wolfe",
    )  # fmt: skip
    n = x.shape[0]

    def closure():
        opt.zero_grad()
        # the objective divided by C·N: the same minimiser, a well-scaled value for the line search
        loss = F.cross_entropy(x @ w + b, y) + (w * w).sum() / (2 * c * n)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def _split_for_c(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    cut = max(1, n // 5)
    return order[cut:], order[:cut]


def select_c(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, grid: tuple[float, ...] = C_GRID, max_iter: int = 500
) -> float:
    """The ``C`` of ``grid`` with the best accuracy on a held-out fifth of (x, y) (ties → stronger regularisation)."""
    fit, val = _split_for_c(x.shape[0])
    best_c, best_acc = grid[0], -math.inf
    for c in grid:
        w, b = fit_logistic_regression(x[fit], y[fit], num_classes, c, max_iter)
        acc = ((x[val].double() @ w + b).argmax(1) == y[val]).double().mean().item()
        if acc > best_acc + 1e-12:
            best_c, best_acc = c, acc
    return best_c


@register_evaluator("linear_probe", needs=(FeatureExtractor,), settings=LinearProbeSettings, train_split=True)
def evaluate_linear_probe(ctx: EvalContext) -> dict[str, float]:
    """Logistic regression on frozen train-split features, scored on the held-out split (CLIP_benchmark names)."""
    settings: LinearProbeSettings = ctx.setting("linear_probe")
    x_train, y_train = extract_features(ctx, ctx.train_batches)
    x_test, y_test = extract_features(ctx)
    if x_train.shape[0] < 10 or x_test.shape[0] == 0:
        raise DataError(f"data: linear_probe needs labelled samples ({x_train.shape[0]} train, {x_test.shape[0]} test)")
    num_classes = len(ctx.classnames) if ctx.classnames else int(torch.cat([y_train, y_test]).max()) + 1
    check_labels(y_train, num_classes, settings.train_split)
    check_labels(y_test, num_classes, "held-out")
    c = select_c(x_train, y_train, num_classes, max_iter=settings.max_iter)
    w, b = fit_logistic_regression(x_train, y_train, num_classes, c, settings.max_iter)
    metrics = classification_metrics(x_test.double() @ w + b, y_test)
    out = {f"lp_{k}": v for k, v in metrics.items()}
    return {**out, "C": c, "n_train": float(x_train.shape[0]), "n": float(x_test.shape[0])}
