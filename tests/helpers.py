"""What several test modules share: paths of the tiny recipes, tiny-run overrides, a tiny model config, shard damage,
launching ranks, reading a run's logs. Fixtures live in conftest.py; test modules import helpers from here only.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONFIGS = ROOT / "configs"
PRE_TINY = CONFIGS / "pretrain-fmnist-tiny.yaml"
FT_TINY = CONFIGS / "finetune" / "fmnist-full-tiny.yaml"
TEXT_TINY = CONFIGS / "finetune" / "fortunes-minilm-tiny.yaml"
TINY_TEXT = (
    "model.text.config={model_type: bert, vocab_size: 30522, hidden_size: 32, num_hidden_layers: 2, "
    "num_attention_heads: 2, intermediate_size: 64, max_position_embeddings: 64}"
)


# ---------------------------------------------------------------------------------------------------------------------
# Configs and runs
# ---------------------------------------------------------------------------------------------------------------------


def tiny_overrides(data_dir: Path | str, out_dir: Path | str, name: str = "run") -> list[str]:
    """Overrides turning a tiny twin into a self-contained run on ``data_dir`` writing under ``out_dir``."""
    return [
        f"data.train={data_dir}",
        f"eval.data={data_dir}",
        f"train.output_dir={out_dir}",
        f"train.name={name}",
        "train.progress=false",
        "train.tensorboard=false",
    ]


def tiny_cfg(*overrides: str):
    """A tiny dual-encoder config (ViT 3 × 32 at 28 px, BERT 2 × 32) for model-level tests."""
    from mm_ptft.config import load_config

    return load_config(
        None,
        [
            "model.image.name=vit_tiny_patch16_224",
            "model.image.image_size=28",
            "model.image.kwargs={patch_size: 7, embed_dim: 32, depth: 3, num_heads: 2}",
            TINY_TEXT,
            "model.text.tokenizer=minilm-l6",
            "model.embed_dim=16",
            *overrides,
        ],
    )


def pretrained_run(base: Path, data: Path) -> Path:
    """A tiny fp32 pretraining run, trained once per session and shared by the fine-tuning tests."""
    from mm_ptft.cli import main

    run = base / "pretrained"
    if not (run / "model.safetensors").is_file():
        overrides = [*tiny_overrides(data, base, "pretrained"), "deepspeed.precision=fp32", "train.steps=20"]
        assert main(["train", "-c", str(PRE_TINY), *overrides, "train.report=false", "eval.max_samples=64"]) == 0
    return run


def records(run_dir: Path, kind: str | None = None) -> list[dict]:
    """The run's metrics.jsonl records (of one kind: train, eval, summary)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if kind is None or r["kind"] == kind]


def summary_of(run_dir: Path) -> dict:
    return records(run_dir)[-1]


def tower_groups(run: Path) -> list[list[str]]:
    """The image tower's layer groups (parameter names, input → output, the projection last) of a run's model."""
    from mm_ptft.config import load_config
    from mm_ptft.models import ImageTower

    cfg = load_config(run / "config.yaml")
    return ImageTower(cfg.model.image, cfg.model.embed_dim).layer_groups()


def recorded_keys(run_dir: Path, rank: int) -> list[tuple[int, list[str]]]:
    """(step, sample keys) of every batch rank ``rank`` consumed (``train.record_keys``)."""
    lines = (run_dir / f"keys_rank{rank}.jsonl").read_text().splitlines()
    return [(r["step"], r["keys"]) for r in map(json.loads, lines)]


def split_attempts(records: list[tuple[int, list[str]]], per_step: int = 1) -> list[list[tuple[int, list[str]]]]:
    """Recorded (step, keys) of a run split into attempts (a resume starts a new one): where the step number goes
    back, or repeats after all ``per_step`` micro-batches of that step were recorded."""
    attempts: list[list[tuple[int, list[str]]]] = []
    last, seen = None, 0
    for step, keys in records:
        if last is None or step < last or (step == last and seen == per_step):
            attempts.append([])
            seen = 0
        seen = seen + 1 if step == last else 1
        attempts[-1].append((step, keys))
        last = step
    return attempts


def ema_overrides(stage: int) -> list[str]:
    """The distributed resume runs under ZeRO-2 keep a weight EMA (ZeRO-3 cannot) and accumulate two micro-batches
    per step (cached contrastive accumulation); ZeRO-3 takes one micro-batch per step."""
    return ["train.ema_decay=0.9", "deepspeed.grad_accum_steps=2"] if stage == 2 else []


def load_script(path: Path):
    """An entry script outside the library (``bench/…``) imported as a module, to call its functions."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------------------------------------------------------------
# Launching ranks
# ---------------------------------------------------------------------------------------------------------------------


def launch_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_launcher(cmd: list, log: Path, timeout: int = 600) -> None:
    """Run a launcher command from the repository root; on failure, show the tail of its log."""
    with log.open("w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=launch_env(), stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{log.read_text()[-4000:]}"


# ---------------------------------------------------------------------------------------------------------------------
# Damaging shards the way real storage and pipelines do
# ---------------------------------------------------------------------------------------------------------------------


def rewrite_shard(path: Path, edit: Callable[[str, bytes], bytes | None]) -> None:
    """Rewrite a tar member by member; ``edit(name, data)`` returns new bytes, or None to drop the member."""
    members = []
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            members.append((m.name, tar.extractfile(m).read()))
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            new = edit(name, data)
            if new is None:
                continue
            info = tarfile.TarInfo(name)
            info.size = len(new)
            tar.addfile(info, io.BytesIO(new))


def tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    """A shard read with plain tarfile into {key: {ext: bytes}} (no mm-ptft code: a reference reader)."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, _, ext = member.name.partition(".")
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def member_names(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


def corrupt_image(path: Path, key: str) -> None:
    rewrite_shard(
        path, lambda n, d: b"\x89PNG\r\n\x1a\n garbage" if n.startswith(key + ".") and n.endswith("png") else d
    )


def drop_caption(path: Path, key: str) -> None:
    rewrite_shard(path, lambda n, d: None if n == key + ".txt" else d)


def truncate(path: Path, fraction: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
