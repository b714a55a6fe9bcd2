"""The detection task through the Trainer and ``mm-ptft eval``, on one process and on two ranks (ZeRO-2 / ZeRO-3,
lock-step evaluation): the gathered metrics equal a one-process evaluation of the saved weights.

Run as a script under torchrun, this file is also the 2-rank scenario of ``test_two_ranks_match_one``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from helpers import BIN, CONFIGS, free_port, run_launcher, tiny_overrides
from PIL import Image

from mm_ptft.config import load_config

TINY = CONFIGS / "detection" / "fmnist-scenes-frcnn-tiny.yaml"


def test_trainer_run_reports_map_and_drawings(scenes, tmp_path):
    from mm_ptft.cli import main

    overrides = [*tiny_overrides(scenes, tmp_path, "det"), "train.steps=4"]
    assert main(["train", "-c", str(TINY), *overrides]) == 0
    run = tmp_path / "det"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    summary = next(r for r in records if r["kind"] == "summary")
    assert 0.0 <= summary["coco/map_50"] <= 1.0 and summary["coco/n_images"] == 24
    assert {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"} <= set(records[0])
    assert "![Detections on held-out images" in (run / "report.md").read_text()
    assert Image.open(run / "plots" / "detections.png").size[0] > 64
    # `mm-ptft eval` of the saved weights gives the numbers the run logged
    assert main(["eval", "--model", str(run), "--out", str(tmp_path / "eval.json")]) == 0
    again = json.loads((tmp_path / "eval.json").read_text())["metrics"]
    compared = [k for k in summary if k.startswith("coco/") and not k.startswith("coco/n_")]
    assert {"coco/map", "coco/map_50"} <= set(compared) and any(k.startswith("coco/ap/") for k in compared)
    for key in compared:
        assert again[key] == pytest.approx(summary[key], abs=1e-6), key


def _two_rank_runs(out: Path, data: Path) -> None:
    from mm_ptft.train.trainer import Trainer

    for stage in (2, 3):
        # 24 test scenes over 2 ranks with batches of 5: rank 0 runs 3 forwards, rank 1 one dummy one (lock-step)
        overrides = [*tiny_overrides(data, out, f"zero{stage}"), f"deepspeed.zero_stage={stage}", "eval.batch_size=5"]
        Trainer(load_config(TINY, [*overrides, "eval.max_samples=21", "train.report=false"])).train()


@pytest.mark.dist
@pytest.mark.slow
def test_two_ranks_match_one(scenes, tmp_path):
    from mm_ptft.cli import main

    cmd = [BIN / "torchrun", "--nproc-per-node", "2", "--master-port", str(free_port()), __file__]
    run_launcher([*cmd, str(tmp_path), str(scenes)], tmp_path / "launch.log")
    for stage in (2, 3):
        run = tmp_path / f"zero{stage}"
        logged = next(json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"summary"' in x)
        assert logged["coco/n_images"] == 21
        out = tmp_path / f"eval{stage}.json"
        assert main(["eval", "--model", str(run), "--out", str(out), "eval.max_samples=21"]) == 0
        single = json.loads(out.read_text())["metrics"]
        for key in ("coco/map", "coco/map_50", "coco/n_boxes", "coco/n_detections"):
            assert single[key] == pytest.approx(logged[key], abs=1e-6), (stage, key)


if __name__ == "__main__":
    _two_rank_runs(Path(sys.argv[1]), Path(sys.argv[2]))
