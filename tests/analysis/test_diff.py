"""``mm-ptft diff``: linear CKA against its feature-space formula, weight change against a direct computation, and a
tower compared with itself (zero change, CKA 1) for both towers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mm_ptft.analysis import linear_cka, relative_change
from mm_ptft.cli import main


def feature_space_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al.'s feature-space form ‖ȲᵀX̄‖²_F / (‖X̄ᵀX̄‖_F ‖ȲᵀȲ‖_F)."""
    x, y = x - x.mean(0), y - y.mean(0)
    return float(np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def test_linear_cka_against_the_feature_space_formula_and_its_invariances():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 12))
    y = x @ rng.normal(size=(12, 7)) + 0.5 * rng.normal(size=(60, 7))
    assert linear_cka(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(feature_space_cka(x, y), rel=1e-10)
    q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    assert linear_cka(torch.from_numpy(x), torch.from_numpy(3.0 * x @ q + 5.0)) == pytest.approx(1.0, abs=1e-12)
    unrelated = linear_cka(torch.from_numpy(x), torch.from_numpy(rng.normal(size=(60, 12))))
    assert unrelated < 0.4
    maps = torch.randn(20, 4, 3, 3)  # (n, C, H, W) features are flattened per sample
    assert linear_cka(maps, maps.reshape(20, -1)) == pytest.approx(1.0, abs=1e-12)


def test_relative_change_against_a_direct_computation():
    a = {"w1": torch.randn(5, 4), "b1": torch.randn(4), "w2": torch.randn(3, 3)}
    b = {k: v.clone() for k, v in a.items()}
    b["w2"] += 0.1 * torch.randn(3, 3)
    rows = relative_change(a, b, [["w1", "b1"], ["w2"]])
    assert rows[0]["relative_change"] == 0.0
    assert rows[1]["relative_change"] == pytest.approx(float((b["w2"] - a["w2"]).norm() / a["w2"].norm()), rel=1e-6)
    assert [r["params"] for r in rows] == [24, 9]


@pytest.mark.parametrize("tower", ["image", "text"])
def test_a_tower_diffed_with_itself_has_zero_change_and_cka_one(pretrained, fmnist_tiny, tmp_path, tower):
    out = tmp_path / "diff"
    args = [
        "diff",
        str(pretrained),
        str(pretrained / "model.safetensors"),
        "--probe",
        str(fmnist_tiny),
        "--tower",
        tower,
    ]
    assert main([*args, "--max-samples", "48", "--out", str(out)]) == 0
    result = json.loads((out / "diff.json").read_text())
    assert result["probe_samples"] == 48 and result["tower"] == tower
    assert len(result["weight_change"]) >= 4  # embeddings, 2 blocks/layers, projection
    assert all(r["relative_change"] == 0.0 for r in result["weight_change"])
    assert len(result["cka"]) >= 4
    assert all(c["cka"] == pytest.approx(1.0, abs=1e-9) for c in result["cka"])
    assert (out / "diff.png").stat().st_size > 0
