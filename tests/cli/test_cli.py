"""The command line: one-line errors before any process group starts; a tiny run end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import tiny_overrides

from mm_ptft.cli import main

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "pretrain-fmnist-tiny.yaml")


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "mm_ptft", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_unknown_config_key_is_one_line(capsys):
    assert main(["train", "-c", TINY, "train.stpes=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: config: unknown key 'train.stpes'") and "\n" not in err


def test_missing_shards_are_one_line_before_distributed_init(tmp_path):
    proc = _cli("train", "-c", TINY, f"data.train={tmp_path}/shard-{{000..003}}.tar", f"train.output_dir={tmp_path}")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: data: 4 of 4 shards of") and "shard-000.tar" in lines[-1]
    assert not any("Traceback" in line for line in lines)
    assert "deepspeed" not in proc.stderr.lower()  # failed before any process group / DeepSpeed start-up


def test_unwritable_output_dir(tmp_path, fmnist_tiny, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")  # no directory can be made below a file, whoever runs the test
    assert main(["train", "-c", TINY, *tiny_overrides(fmnist_tiny, blocker / "runs")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: config: train.output_dir {blocker / 'runs'} is not writable") and "\n" not in err


def test_tiny_run_end_to_end_then_eval_and_consolidate(tmp_path, fmnist_tiny, capsys):
    assert main(["train", "-c", TINY, *tiny_overrides(fmnist_tiny, tmp_path), "deepspeed.precision=fp32"]) == 0
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "model.safetensors", "report.md", "plots/loss.png"):
        assert (run / name).exists(), name
    summary = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert summary["kind"] == "summary" and summary["step"] == 6
    assert summary["zeroshot/n"] == 256 and summary["samples"] == 6 * 16  # eval.max_samples, each scored once
    capsys.readouterr()
    assert main(["eval", "--model", str(run), "--out", str(tmp_path / "e.json")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    # the standalone evaluator on the consolidated weights gives the in-training evaluation's numbers (both fp32)
    for key in ("zeroshot/acc1", "zeroshot/acc5", "zeroshot/mean_per_class_recall"):
        assert result["metrics"][key] == pytest.approx(summary[key], abs=1e-6), key
    assert main(["consolidate", str(run), "--out", str(tmp_path / "c.safetensors")]) == 0
    from mm_ptft.checkpoint import load_weights

    a, b = load_weights(tmp_path / "c.safetensors"), load_weights(run / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_resume_of_another_architecture_is_refused(tmp_path, fmnist_tiny, capsys):
    assert main(["train", "-c", TINY, *tiny_overrides(fmnist_tiny, tmp_path), "train.steps=2"]) == 0
    capsys.readouterr()
    code = main(
        ["train", "-c", TINY, *tiny_overrides(fmnist_tiny, tmp_path), "train.resume=latest", "model.embed_dim=48"]
    )
    assert code == 2
    assert "another architecture (model.embed_dim: 32 vs 48)" in capsys.readouterr().err
