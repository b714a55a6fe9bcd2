"""Linear centred kernel alignment (Kornblith et al., 2019) between two sets of features of the same samples."""

from __future__ import annotations

import torch


def _centred_gram(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(x.shape[0], -1).double()
    x = x - x.mean(dim=0, keepdim=True)  # centre each feature over the samples
    return x @ x.T  # (n, n): cheap for wide features (a ViT layer's tokens × width) and a few hundred samples


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of features ``x`` (n, …) and ``y`` (n, …) of the same n samples, each flattened per sample.

    ``⟨K, L⟩_F / (‖K‖_F ‖L‖_F)`` with K = X̄X̄ᵀ, L = ȲȲᵀ the Gram matrices of the column-centred features — equal to
    the feature-space form ``‖ȲᵀX̄‖²_F / (‖X̄ᵀX̄‖_F ‖ȲᵀȲ‖_F)``. 1 for identical features (and any rotation or
    isotropic scaling of them), near 0 for unrelated ones.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs the same samples: {x.shape[0]} vs {y.shape[0]} rows")
    k, lmat = _centred_gram(x), _centred_gram(y)
    denominator = torch.linalg.norm(k) * torch.linalg.norm(lmat)
    if denominator == 0:
        return float("nan")  # a constant feature set has no similarity structure
    return float((k * lmat).sum() / denominator)
