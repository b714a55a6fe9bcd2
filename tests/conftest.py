"""Shared fixtures: tiny Fashion-MNIST shard sets (real images, a few hundred samples), the tiny pretrained run the
fine-tuning, evaluation and analysis tests start from, the detection scenes, and the grouped multi-process runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import BIN, ROOT, corrupt_image, free_port, member_names, pretrained_run, run_launcher

FMNIST_SRC = Path("/usr/share/datasets/fashion-mnist")

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def fmnist_tiny(tmp_path_factory) -> Path:
    """600 train / 600 test real Fashion-MNIST samples in shards of 100."""
    if not FMNIST_SRC.is_dir():
        pytest.skip("Debian package dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
    out = tmp_path_factory.mktemp("fmnist") / "fmnist-tiny"
    cmd = [sys.executable, "-m", "data_tools", "fashion-mnist", "--out", str(out), "--limit", "600"]
    subprocess.run([*cmd, "--shard-size", "100"], check=True, cwd=ROOT, capture_output=True)
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


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory, fmnist_tiny) -> Path:
    """The tiny fp32 pretraining run (20 steps) that fine-tuning, evaluation and analysis tests start from."""
    return pretrained_run(tmp_path_factory.getbasetemp() / "finetune-shared", fmnist_tiny)


@pytest.fixture(scope="session")
def noisy_tiny(fmnist_tiny, tmp_path_factory) -> Path:
    """fmnist_tiny with 30 % of its train captions replaced (``data_tools corrupt-captions``, seed 0)."""
    from data_tools.cli import main

    out = tmp_path_factory.mktemp("curate") / "noisy"
    args = ["corrupt-captions", "--src", str(fmnist_tiny), "--out", str(out), "--fraction", "0.3", "--seed", "0"]
    assert main(args) == 0
    return out


@pytest.fixture(scope="session")
def noisy_tiny_scores(noisy_tiny, pretrained, tmp_path_factory) -> Path:
    """``data_tools score`` of noisy_tiny's train split under the tiny pretrained model."""
    from data_tools.cli import main

    out = tmp_path_factory.mktemp("scores") / "noisy.parquet"
    args = ["score", "--model", str(pretrained), "--data", str(noisy_tiny), "--out", str(out), "--batch-size", "64"]
    assert main([*args, "--quiet"]) == 0
    return out


@pytest.fixture(scope="session")
def scenes(tmp_path_factory) -> Path:
    """64 px Fashion-MNIST detection scenes: 48 train / 16 val / 24 test, shards of 16."""
    if not FMNIST_SRC.is_dir():
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    from data_tools import main as data_tools_main

    out = tmp_path_factory.mktemp("scenes") / "scenes"
    args = ["detection-scenes", "--out", str(out), "--canvas", "64", "--scale", "0.8", "1.2", "--objects", "1", "3"]
    assert data_tools_main([*args, "--train", "48", "--val", "16", "--test", "24", "--shard-size", "16"]) == 0
    return out


@pytest.fixture(scope="session")
def scenarios(tmp_path_factory, fmnist_tiny) -> Path:
    """The grouped multi-process runs of tests/dist_scenarios.py (torchrun phase 1, deepspeed phase 2), launched
    once per session; tests/distributed/ asserts on what they leave behind."""
    out = tmp_path_factory.mktemp("dist")
    bad = out / "bad-data"
    shutil.copytree(fmnist_tiny, bad)
    for shard in sorted((bad / "train").glob("*.tar")):  # one undecodable image in every shard
        key = sorted({n.split(".")[0] for n in member_names(shard)})[5]
        corrupt_image(shard, key)
    script = str(ROOT / "tests" / "dist_scenarios.py")
    run_launcher(
        [BIN / "torchrun", "--nproc-per-node", "2", "--master-port", str(free_port()), script, str(out),
         str(fmnist_tiny), "phase1", "--bad-data", str(bad)],
        out / "phase1.log",
    )  # fmt: skip
    port = free_port()
    (out / "phase2.port").write_text(str(port))
    run_launcher(
        [BIN / "deepspeed", "--num_gpus", "2", "--master_port", str(port), script, str(out), str(fmnist_tiny),
         "phase2"],
        out / "phase2.log",
    )  # fmt: skip
    return out
