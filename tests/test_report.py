"""Tests for mm_ptft.report: metrics parsing, summary numbers, plots and the markdown report."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mm_ptft import report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
T0 = 1_700_000_000.0
STEPS = list(range(10, 310, 10))  # 30 train records, steps 10..300
BATCH = 256


def _throughput(step: int) -> float:
    # Slow warm-up then a deterministic wobble, so mean != median and warm-up matters.
    return 100.0 + step if step < 40 else 1000.0 + (step * 37) % 101


def _train_record(step: int) -> dict:
    return {
        "kind": "train",
        "step": step,
        "time": T0 + 0.5 * step,
        "loss": 5 - 0.01 * step,
        "lr": 1e-3 * step / 300,
        "lr/backbone": 1e-4 * step / 300,
        "logit_scale": 14.0 + step / 100,
        "samples_per_s": _throughput(step),
        "step_time_s": 0.5,
        "data_wait_frac": 0.02 * (step % 3),
        "epoch": step / 100,
        "samples": step * BATCH,
        "bad_samples": step // 100,
    }


EVALS = [
    {"kind": "eval", "step": 150, "time": T0 + 80, "zeroshot/acc1": 0.31, "zeroshot/acc5": 0.6, "val/loss": 2.5},
    {"kind": "eval", "step": 300, "time": T0 + 160, "zeroshot/acc1": 0.27, "zeroshot/acc5": 0.65, "val/loss": 2.25},
]


def _write_run(run_dir: Path, records: list[dict], tail: str = "", config: str | None = None) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in records]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + ("\n" if lines else "") + tail)
    if config is not None:
        (run_dir / "config.yaml").write_text(config)
    return run_dir


@pytest.fixture
def full_run(tmp_path: Path) -> Path:
    records = [_train_record(s) for s in STEPS[:15]] + [EVALS[0]] + [_train_record(s) for s in STEPS[15:]]
    records += [EVALS[1], {"kind": "profile", "step": 5, "foo": 1}, {"kind": "summary", "step": 300, "note": "done"}]
    # Partial last line, as left by a run killed mid-write.
    return _write_run(tmp_path / "run1", records, tail='{"kind": "train", "step": 31', config="model:\n  name: vit\n")


def _links(text: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)


def _assert_png(path: Path) -> None:
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size[0] > 0 and img.size[1] > 0


def test_read_metrics_skips_partial_line(full_run: Path) -> None:
    records, skipped = report.read_metrics(full_run / "metrics.jsonl")
    assert skipped == 1
    assert len(records) == len(STEPS) + 2 + 2
    assert report.load_metrics(full_run) == records


def test_summarize_exact_numbers(full_run: Path) -> None:
    stats = report.summarize(report.load_metrics(full_run))
    assert stats["steps"] == 300
    assert stats["num_train_records"] == 30 and stats["num_eval_records"] == 2
    assert stats["samples"] == 300 * BATCH
    assert stats["bad_samples"] == 3
    assert stats["wall_time_s"] == pytest.approx(160.0 - 5.0)  # first train line to last eval line
    assert stats["final_loss"] == pytest.approx(2.0) and stats["final_loss_step"] == 300
    assert stats["min_loss"] == pytest.approx(2.0) and stats["min_loss_step"] == 300
    assert stats["nan_loss_steps"] == 0
    assert stats["final_lr"] == pytest.approx(1e-3)
    assert stats["final_logit_scale"] == pytest.approx(17.0)
    assert stats["final_logit_bias"] is None
    assert stats["summary"] == {"step": 300, "note": "done"}


def test_summarize_steady_state_throughput(full_run: Path) -> None:
    stats = report.summarize(report.load_metrics(full_run))
    steps = np.array(STEPS)
    sps = np.array([_throughput(s) for s in STEPS])
    cutoff = steps.min() + 0.1 * (steps.max() - steps.min())  # first 10% of the step range is warm-up
    assert stats["steady_state_from_step"] == pytest.approx(cutoff)
    assert stats["median_samples_per_s"] == pytest.approx(float(np.median(sps[steps >= cutoff])))
    assert stats["median_samples_per_s"] != pytest.approx(float(np.median(sps)))
    wait = np.array([0.02 * (s % 3) for s in STEPS])
    assert stats["mean_data_wait_frac"] == pytest.approx(float(wait.mean()))


def test_summarize_eval_final_and_best(full_run: Path) -> None:
    ev = report.summarize(report.load_metrics(full_run))["eval"]
    assert set(ev) == {"zeroshot/acc1", "zeroshot/acc5", "val/loss"}
    assert ev["zeroshot/acc1"] == {
        "final": 0.27,
        "final_step": 300,
        "best": 0.31,
        "best_step": 150,
        "higher_is_better": True,
        "score": True,
    }
    assert ev["zeroshot/acc5"]["best"] == 0.65 and ev["zeroshot/acc5"]["best_step"] == 300
    assert ev["val/loss"]["higher_is_better"] is False
    assert ev["val/loss"]["best"] == 2.25 and ev["val/loss"]["best_step"] == 300


def test_write_report_full(full_run: Path) -> None:
    path = report.write_report(full_run)
    assert path == full_run / "report.md"
    text = path.read_text()
    assert text.startswith("# run1\n")
    for expected in (
        "76,800",
        "| Bad samples | 3 |",
        "| Min loss | 2 (step 300) |",
        "| Non-finite loss steps | 0 |",
        "| zeroshot/acc1 ↑ | 0.27 | 300 | 0.31 | 150 |",
        "| val/loss ↓ | 2.25 | 300 | 2.25 | 300 |",
        "| note | done |",
        "(1)",
    ):
        assert expected in text, expected
    links = _links(text)
    names = {"loss", "lr", "logit_scale", "samples_per_s", "data_wait", "eval"}
    assert {f"plots/{n}.png" for n in names} == set(links)
    assert "![loss](plots/loss.png)" in text
    for link in links:
        _assert_png(full_run / link)
    assert "<details>" in text and "```yaml\nmodel:\n  name: vit\n```" in text


def test_sections_images_and_title(full_run: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere" / "loss.png"  # same name as a generated plot
    outside.parent.mkdir()
    _write_tiny_png(outside)
    inside = full_run / "extra" / "conf mat.png"
    inside.parent.mkdir()
    _write_tiny_png(inside)
    text = report.write_report(
        full_run,
        title="My run",
        sections={"Notes": "all good"},
        images={"outside fig": outside, "inside fig": inside, "gone": tmp_path / "nope.png"},
    ).read_text()
    assert text.startswith("# My run\n")
    assert "## Notes\n\nall good" in text
    assert "![outside fig](plots/loss_1.png)" in text
    assert "![inside fig](extra/conf%20mat.png)" in text
    assert "_missing image:" in text
    _assert_png(full_run / "plots" / "loss_1.png")
    # Sections and images come after the plots, config comes last.
    assert text.index("## Plots") < text.index("## Notes") < text.index("## Figures") < text.index("## Config")


def _write_tiny_png(path: Path) -> None:
    Image.new("RGB", (4, 4), "red").save(path)


def test_empty_metrics_file(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "empty", [])
    stats = report.summarize(report.load_metrics(run))
    assert stats["steps"] is None and stats["final_loss"] is None and stats["eval"] == {}
    text = report.write_report(run).read_text()
    assert "## Summary" in text and _links(text) == []
    assert not list(run.glob("plots/*.png"))


def test_missing_metrics_file_and_config(tmp_path: Path) -> None:
    run = tmp_path / "bare"
    run.mkdir()
    text = report.write_report(run).read_text()
    assert "## Config" not in text and _links(text) == []


def test_only_eval_records(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "evalonly", EVALS)
    stats = report.summarize(report.load_metrics(run))
    assert stats["steps"] == 300 and stats["final_loss"] is None and stats["median_samples_per_s"] is None
    text = report.write_report(run).read_text()
    assert _links(text) == ["plots/eval.png"]
    _assert_png(run / "plots" / "eval.png")
    assert not (run / "plots" / "loss.png").exists()


def test_partial_train_keys_plot_subset(tmp_path: Path) -> None:
    records = [
        {"kind": "train", "step": s, "time": T0 + s, "loss": 1.0 / s, "logit_scale": 10.0, "logit_bias": -10.0}
        for s in range(1, 21)
    ]
    run = _write_run(tmp_path / "partial", records)
    text = report.write_report(run).read_text()
    assert set(_links(text)) == {"plots/loss.png", "plots/logit_scale.png"}
    assert "| Final logit bias | -10 |" in text


def test_nan_loss(tmp_path: Path) -> None:
    records = [_train_record(s) for s in STEPS]
    records[5]["loss"] = math.nan
    records[6]["loss"] = math.inf
    records[7]["loss"] = None
    run = _write_run(tmp_path / "nan", records)
    assert "NaN" in (run / "metrics.jsonl").read_text()  # Python's json writes bare NaN tokens
    stats = report.summarize(report.load_metrics(run))
    assert stats["nan_loss_steps"] == 3
    assert stats["min_loss"] == pytest.approx(2.0) and math.isfinite(stats["final_loss"])
    text = report.write_report(run).read_text()
    assert "| Non-finite loss steps | 3 |" in text
    _assert_png(run / "plots" / "loss.png")


def test_all_nan_loss_has_no_loss_plot(tmp_path: Path) -> None:
    records = [{"kind": "train", "step": s, "time": T0 + s, "loss": math.nan, "lr": 0.1} for s in range(1, 6)]
    run = _write_run(tmp_path / "allnan", records)
    text = report.write_report(run).read_text()
    assert _links(text) == ["plots/lr.png"]
    assert "| Final loss | n/a |" in text and "| Non-finite loss steps | 5 |" in text


def test_stale_plot_removed_on_regeneration(full_run: Path) -> None:
    report.write_report(full_run)
    assert (full_run / "plots" / "eval.png").exists()
    lines = (full_run / "metrics.jsonl").read_text().splitlines()
    (full_run / "metrics.jsonl").write_text("\n".join(ln for ln in lines if '"eval"' not in ln))
    text = report.write_report(full_run).read_text()
    assert "plots/eval.png" not in text and not (full_run / "plots" / "eval.png").exists()


def test_garbage_lines_and_unknown_kinds(tmp_path: Path) -> None:
    run = tmp_path / "garbage"
    run.mkdir()
    (run / "metrics.jsonl").write_text('[1, 2]\nnot json\n{"kind": "weird"}\n{"kind": "train", "step": "x"}\n\n')
    records, skipped = report.read_metrics(run / "metrics.jsonl")
    assert skipped == 2 and len(records) == 2
    stats = report.summarize(records)
    assert stats["num_train_records"] == 0 and stats["steps"] is None
    report.write_report(run)


def test_cli_regenerates(full_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mm_ptft.cli import main

    assert main(["report", str(full_run), "--title", "cli"]) == 0
    assert capsys.readouterr().out.strip() == str(full_run / "report.md")
    assert (full_run / "report.md").read_text().startswith("# cli\n")


def test_cli_rejects_missing_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mm_ptft.cli import main

    assert main(["report", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.strip() == f"error: report: not a directory: {tmp_path / 'missing'}"


def test_counts_are_reported_but_never_ranked_or_drawn_with_the_scores(tmp_path: Path, monkeypatch) -> None:
    """`zeroshot/n` (10,000 held-out images) on the accuracies' axes would flatten them onto zero."""
    evals = [
        {"kind": "eval", "step": s, "time": T0 + s, "zeroshot/acc1": a, "zeroshot/n": 10000.0, "linear_probe/C": c}
        for s, a, c in ((10, 0.5, 100.0), (20, 0.7, 1.0))
    ]
    run = _write_run(tmp_path / "run", [_train_record(s) for s in (10, 20)] + evals)
    drawn, save = {}, report._save

    def keep(fig, path):
        drawn[path.name] = [(line.get_label(), ax.get_ylim()) for ax in fig.axes for line in ax.get_lines()]
        return save(fig, path)

    monkeypatch.setattr(report, "_save", keep)
    report.write_report(run)
    assert [label for label, _ in drawn["eval.png"]] == ["zeroshot/acc1"]
    assert drawn["eval.png"][0][1][1] < 1.0  # the accuracy curve spans its own axis
    ev = report.summarize(report.load_metrics(run))["eval"]
    assert ev["zeroshot/n"]["score"] is False and ev["zeroshot/n"]["best"] is None
    assert ev["zeroshot/acc1"]["best"] == 0.7
    table = (run / "report.md").read_text()
    assert "| zeroshot/n (count) | 10,000.0 | 20 |  |  |" in table


@pytest.mark.parametrize(
    ("name", "higher"),
    [
        ("zeroshot/acc1", True),
        ("retrieval/text_retrieval_recall@5", True),
        ("det/mAP@0.5", True),
        ("val/loss", False),
        ("val/error_rate", False),
        ("zeroshot/mean_per_class_recall", True),
    ],
)
def test_higher_is_better(name: str, higher: bool) -> None:
    assert report.higher_is_better(name) is higher


def test_ema_and_formatting() -> None:
    np.testing.assert_allclose(report.ema(np.full(100, 3.0)), 3.0)
    assert report.ema(np.array([1.0, 2.0]), beta=0.0).tolist() == [1.0, 2.0]
    assert report.fmt(1234567) == "1,234,567"
    assert report.fmt(0.31) == "0.31"
    assert report.fmt(5e-5) == "5.000e-05"
    assert report.fmt(None) == "n/a"
    assert report.fmt(math.nan) == "nan"
    assert report.fmt_duration(3723) == "1h 02m 03s"
    assert report.fmt_duration(12.34) == "12.3s"
