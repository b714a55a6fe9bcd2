"""Contrastive losses: InfoNCE (CLIP) with cross-rank feature gather, and SigLIP's sigmoid loss.

Both reuse open_clip's implementations; this module adapts them to mm-ptft's model output dict and registry.
Rank and world size are given by the caller (the task builder), so the loss never initialises a process group.
A new loss is one class registered in ``LOSSES``: ``__init__(cfg, rank, world_size)``, ``forward(model output) ->
{"loss"}``, and a ``check_config(cfg)`` classmethod for what it needs of the rest of the config.

Feature-cached accumulation (``loss.accumulation=cached``, see ``mm_ptft.train.accumulate``) computes the loss once
over the features of every micro-batch of every rank, on a single device, in row blocks. A loss takes part by
saying which rows of the gathered batch this rank's loss covers (``rows``), what a block of them contributes
(``rows_loss``), and how the ranks' gradients combine (``grad_reduction``); :func:`feature_gradients` does the rest.
A loss may also give the block's gradient in closed form (``rows_grad``, accumulated in place into preallocated
gradients): both built-in losses do, which keeps the loss's own memory at a few blocks of logits on top of the
gradients themselves (autograd of ``rows_loss`` makes full N × D temporaries for every block).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from open_clip import loss as open_clip_loss
from torch import nn

from mm_ptft.config import ConfigError, LossConfig
from mm_ptft.registry import Registry

LOSSES: Registry[nn.Module] = Registry("loss")

# how the feature gradients of the ranks' losses combine into each rank's own: summed over ranks ("sum"), every
# rank computes the same loss ("replicated": the sum is world × its own), or each rank's own only ("none")
GradReduction = Literal["sum", "replicated", "none"]
# logits per block of rows in feature_gradients, by device type: on the host each block's logits, softmax and their
# gradients stay resident in the allocator for the step (measured with autograd of rows_loss: ~230 MB for 16 MiB
# blocks at N = 8,192, ~100 MB for 4 MiB ones, at the same time); on an accelerator larger blocks mean fewer launches
BLOCK_ELEMENTS = {"cpu": 2**20}
DEFAULT_BLOCK_ELEMENTS = 2**24


def _block_backward(
    g: torch.Tensor, raw: torch.Tensor, x_rows: torch.Tensor, y: torch.Tensor, gx_rows, gy, scale: float, grads: dict
) -> None:
    """Accumulate the gradient of a block of logits ``scale · x_rows @ y.T (+ bias)`` whose gradient is ``g``, where
    ``raw = x_rows @ y.T``: into ``gx_rows`` (the rows' gradient, a view) and ``gy`` in place, and the scalars."""
    gx_rows.addmm_(g, y, alpha=scale)
    gy.addmm_(g.T, x_rows, alpha=scale)
    grads["logit_scale"] += torch.dot(g.view(-1), raw.view(-1))
    if grads.get("logit_bias") is not None:
        grads["logit_bias"] += g.sum()


def _features(out: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    # losses run in fp32 (outside autocast too) even when the towers run in bf16: logits need the mantissa
    bias = out.get("logit_bias")
    return (
        out["image_features"].float(),
        out["text_features"].float(),
        out["logit_scale"].float(),
        bias.float() if bias is not None else None,
    )


@LOSSES.register("clip")
class ClipLoss(nn.Module):
    """Symmetric InfoNCE over the global batch (open_clip's ClipLoss).

    With ``gather_with_grad`` the features of every rank are all-gathered with gradient, so the gradient averaged
    over ranks equals the single-process gradient of the concatenated batch. ``local_loss`` computes only the local
    rows against all columns: the same mean loss and gradient, with a (B_local × B_global) logit matrix.
    """

    @classmethod
    def check_config(cls, cfg) -> None:
        """Nothing beyond its own section."""

    def __init__(self, cfg: LossConfig, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.local_loss = cfg.local_loss
        # how the ranks' feature gradients combine in cached accumulation, as open_clip's gather does in backward:
        # with gradient, every rank's loss reaches every feature (summed); without, a rank's own features only
        if not cfg.gather_with_grad:
            self.grad_reduction: GradReduction = "none"
        else:
            self.grad_reduction = "sum" if cfg.local_loss else "replicated"
        self.impl = open_clip_loss.ClipLoss(
            local_loss=cfg.local_loss,
            gather_with_grad=cfg.gather_with_grad,
            cache_labels=True,
            rank=rank,
            world_size=world_size,
        )

    def forward(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        image, text, scale, bias = _features(out)
        with torch.autocast(image.device.type, enabled=False):
            return {"loss": self.impl(image, text, scale, bias)}

    def rows(self, own: slice, total: int) -> slice:
        """A local loss covers this rank's rows (against every column); the full loss, every row."""
        return own if self.local_loss else slice(0, total)

    def rows_loss(self, image, text, scale, bias, rows: slice, n_rows: int) -> torch.Tensor:
        """Rows ``rows`` of both cross-entropies (image→text and text→image), as a share of a loss over ``n_rows``."""
        labels = torch.arange(rows.start, rows.stop, device=image.device)
        per_image = scale * image[rows] @ text.T
        per_text = scale * text[rows] @ image.T
        if bias is not None:
            per_image, per_text = per_image + bias, per_text + bias
        ce = F.cross_entropy(per_image, labels, reduction="sum") + F.cross_entropy(per_text, labels, reduction="sum")
        return ce / (2 * n_rows)

    def rows_grad(self, image, text, scale, bias, rows: slice, n_rows: int, grads: dict) -> torch.Tensor:
        """:meth:`rows_loss` (returned) with its gradient added to ``grads`` in closed form: for each direction,
        d(cross-entropy)/d(logits) = softmax - one-hot, through the two matrix products."""
        n = rows.stop - rows.start
        diag = (torch.arange(n, device=image.device), torch.arange(rows.start, rows.stop, device=image.device))
        s = float(scale)
        total = torch.zeros((), dtype=torch.float32, device=image.device)
        for x, y, gx, gy in (
            (image, text, grads["image_features"], grads["text_features"]),
            (text, image, grads["text_features"], grads["image_features"]),
        ):
            raw = x[rows] @ y.T
            logits = raw * s if bias is None else torch.addcmul(bias, raw, scale)
            lse = torch.logsumexp(logits, dim=1)
            total += (lse - logits[diag]).sum()
            g = logits.sub_(lse[:, None]).exp_()  # the softmax, in place
            g[diag] -= 1.0
            g.div_(2 * n_rows)
            _block_backward(g, raw, x[rows], y, gx[rows], gy, s, grads)
        return total / (2 * n_rows)


@LOSSES.register("siglip")
class SigLipLoss(nn.Module):
    """Pairwise sigmoid loss (SigLIP, open_clip's SigLipLoss) with neighbour exchange of text features."""

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.model.logit_bias_init is None:
            raise ConfigError("config: loss.name=siglip needs model.logit_bias_init (e.g. -10)")

    def __init__(self, cfg: LossConfig, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.impl = open_clip_loss.SigLipLoss(rank=rank, world_size=world_size)

    # each rank scores its own images against every text, and the text features travel with gradient
    grad_reduction: GradReduction = "sum"

    def forward(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        image, text, scale, bias = _features(out)
        if bias is None:
            raise ValueError("the siglip loss needs a logit bias: set model.logit_bias_init (e.g. -10)")
        with torch.autocast(image.device.type, enabled=False):
            return {"loss": self.impl(image, text, scale, bias)}

    def rows(self, own: slice, total: int) -> slice:
        return own

    def rows_loss(self, image, text, scale, bias, rows: slice, n_rows: int) -> torch.Tensor:
        """-Σ log σ(±(s·x·y + b)) over image rows ``rows`` × every text, divided by the ``n_rows`` images scored."""
        logits = scale * image[rows] @ text.T + bias
        signs = -torch.ones_like(logits)
        signs[torch.arange(logits.shape[0]), torch.arange(rows.start, rows.stop)] = 1.0
        return -F.logsigmoid(signs * logits).sum() / n_rows

    def rows_grad(self, image, text, scale, bias, rows: slice, n_rows: int, grads: dict) -> torch.Tensor:
        """:meth:`rows_loss` (returned) with its gradient added to ``grads`` in closed form: with z = ±logits,
        d(-log σ(z))/d(logits) = ∓σ(-z)."""
        n = rows.stop - rows.start
        diag = (torch.arange(n, device=image.device), torch.arange(rows.start, rows.stop, device=image.device))
        raw = image[rows] @ text.T
        z = torch.addcmul(bias, raw, scale).neg_()  # z = signs · logits: negative pairs off the diagonal ...
        z[diag] *= -1.0  # ... the positive ones on it
        total = -F.logsigmoid(z).sum() / n_rows
        g = z.neg_().sigmoid_()  # σ(-z); the gradient is -signs · σ(-z) / n_rows
        g[diag] *= -1.0
        g.div_(n_rows)
        _block_backward(
            g, raw, image[rows], text, grads["image_features"][rows], grads["text_features"], float(scale), grads
        )
        return total


def feature_gradients(
    loss: nn.Module,
    image: torch.Tensor,
    text: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    own: slice,
    block_elements: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    """This rank's loss over the gathered features of the whole batch, and its gradient with respect to each input.

    ``image`` and ``text`` are (N, D) for all N pairs of the global batch (every micro-batch of every rank), ``own``
    the rows this rank holds. The loss is evaluated in blocks of rows with at most ``block_elements`` logits each,
    each block back-propagated before the next is built, so memory grows with N · block, never N² (default: by
    device type, :data:`BLOCK_ELEMENTS`). Returns the loss
    (fp32 scalar, detached) and ``{"image_features", "text_features", "logit_scale", "logit_bias"}`` gradients.
    """
    leaves = {
        "image_features": image.detach().float().requires_grad_(),
        "text_features": text.detach().float().requires_grad_(),
        "logit_scale": scale.detach().float().requires_grad_(),
        "logit_bias": bias.detach().float().requires_grad_() if bias is not None else None,
    }
    n = leaves["image_features"].shape[0]
    rows = loss.rows(own, n)
    n_rows = rows.stop - rows.start
    if block_elements is None:
        block_elements = BLOCK_ELEMENTS.get(image.device.type, DEFAULT_BLOCK_ELEMENTS)
    block = max(1, block_elements // n)
    total = torch.zeros((), dtype=torch.float32, device=image.device)
    args = [leaves[k] for k in ("image_features", "text_features", "logit_scale", "logit_bias")]
    if hasattr(loss, "rows_grad"):  # closed form, accumulated in place: no autograd temporaries
        grads = {k: torch.zeros_like(v) if v is not None else None for k, v in leaves.items()}
        with torch.autocast(image.device.type, enabled=False), torch.no_grad():
            for start in range(rows.start, rows.stop, block):
                total += loss.rows_grad(*args, slice(start, min(start + block, rows.stop)), n_rows, grads)
        return total, grads
    with torch.autocast(image.device.type, enabled=False), torch.enable_grad():
        for start in range(rows.start, rows.stop, block):
            part = loss.rows_loss(*args, slice(start, min(start + block, rows.stop)), n_rows)
            part.backward()
            total += part.detach()
    grads = {
        k: (v.grad if v.grad is not None else torch.zeros_like(v)) if v is not None else None for k, v in leaves.items()
    }
    return total, grads


def create_loss(cfg: LossConfig, rank: int = 0, world_size: int = 1) -> nn.Module:
    return LOSSES.create(cfg.name, cfg, rank=rank, world_size=world_size)
