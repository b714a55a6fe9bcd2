"""Shared fixtures: tiny configs and tiny Fashion-MNIST shard sets (real images, a few hundred samples)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FMNIST_SRC = Path("/usr/share/datasets/fashion-mnist")

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def tiny_overrides(data_dir: Path | str, out_dir: Path | str, name: str = "run") -> list[str]:
    """Overrides turning the tiny twin into a self-contained run on ``data_dir`` writing under ``out_dir``."""
    return [
        f"data.train={data_dir}",
        f"eval.data={data_dir}",
        f"train.output_dir={out_dir}",
        f"train.name={name}",
        "train.progress=false",
        "train.tensorboard=false",
    ]


@pytest.fixture(scope="session")
def fmnist_tiny(tmp_path_factory) -> Path:
    """600 train / 600 test real Fashion-MNIST samples in shards of 100."""
    if not FMNIST_SRC.is_dir():
        pytest.skip("Debian package dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
    out = tmp_path_factory.mktemp("fmnist") / "fmnist-tiny"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "data_tools",
            "fashion-mnist",
            "--out",
            str(out),
            "--limit",
            "600",
            "--shard-size",
            "100",
        ],
        check=True,
        cwd=ROOT,
        capture_output=True,
    )
    return out


@pytest.fixture
def fmnist_copy(fmnist_tiny, tmp_path) -> Path:
    """A private copy of the tiny shards that a test may corrupt."""
    dst = tmp_path / "fmnist"
    shutil.copytree(fmnist_tiny, dst)
    return dst


@pytest.fixture(scope="session")
def tiny_config_path() -> Path:
    return ROOT / "configs" / "pretrain-fmnist-tiny.yaml"
