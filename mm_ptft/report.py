"""Run report: turn a run directory's ``metrics.jsonl`` into ``report.md`` plus PNG plots.

The trainer calls :func:`write_report` at the end of every run; the same report can be regenerated
(e.g. for a run that was killed) with::

    mm-ptft report RUN_DIR [--title TITLE]

Layout of a run directory::

    run_dir/metrics.jsonl   # one JSON object per line, each with "kind", "step", "time"
    run_dir/config.yaml     # resolved config (optional)
    run_dir/report.md       # written here
    run_dir/plots/*.png     # written here
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
REPORT_FILE = "report.md"
PLOTS_DIR = "plots"

WARMUP_FRAC = 0.1
"""Fraction of the logged step range treated as warm-up and excluded from steady-state statistics."""

DPI = 110
_PANEL_SIZE = (7.0, 3.4)
# Every file name this module may generate; ones not produced on a rerun are deleted so a
# regenerated report never sits next to an outdated image.
_GENERATED_PLOTS = ("loss.png", "lr.png", "logit_scale.png", "samples_per_s.png", "data_wait.png", "eval.png")
# Metric-name fragments for which a smaller value is better (losses, error rates, timings).
_LOWER_IS_BETTER = re.compile(r"loss|err|nll|ppl|perplexity|time|latency", re.IGNORECASE)
# Logged beside the scores but not scores: sample counts (``n``, ``n_train``, ``n_boxes``…) and values an evaluator
# chose (the linear probe's ``C``). Reported as they are, never ranked or drawn on the scores' axes.
_NOT_SCORE = re.compile(r"^(n|n_\w+|C)$")


# ----------------------------------------------------------------------------- loading


def read_metrics(path: str | Path) -> tuple[list[dict[str, Any]], int]:
    """Parse a metrics JSONL file, tolerating damage.

    Args:
        path: Path of the ``metrics.jsonl`` file.

    Returns:
        ``(records, skipped)``: every line that parsed to a JSON object, in file order, and the
        number of non-empty lines that did not (e.g. the partial last line of a killed run).
        A missing file gives ``([], 0)``.
    """
    path = Path(path)
    if not path.is_file():
        return [], 0
    records: list[dict[str, Any]] = []
    skipped = 0
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                skipped += 1
                continue
            if isinstance(record, dict):
                records.append(record)
            else:
                skipped += 1
    return records, skipped


def load_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Load ``run_dir/metrics.jsonl``, skipping (and logging the count of) unparseable lines.

    Args:
        run_dir: Run directory.

    Returns:
        The parsed records in file order; empty if the file is missing or empty.
    """
    records, skipped = read_metrics(Path(run_dir) / METRICS_FILE)
    if skipped:
        log.warning("skipped %d unparseable line(s) in %s", skipped, Path(run_dir) / METRICS_FILE)
    return records


# ----------------------------------------------------------------------------- series helpers


def _num(value: Any) -> float | None:
    """Return ``value`` as a float if it is a real number (bools excluded), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _step(record: Mapping[str, Any]) -> int | None:
    step = _num(record.get("step"))
    return int(step) if step is not None and math.isfinite(step) else None


def _by_kind(records: Sequence[Mapping[str, Any]], kind: str) -> list[Mapping[str, Any]]:
    """Records of one kind that carry a valid step, sorted by step.

    The sort is stable so that duplicate steps from a resumed run keep their file order.
    """
    out = [r for r in records if r.get("kind") == kind and _step(r) is not None]
    out.sort(key=_step)
    return out


def _series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values)`` of every record holding ``key``; non-numeric values become NaN."""
    pairs = [(_step(r), _num(r[key])) for r in records if key in r]
    steps = np.array([s for s, _ in pairs], dtype=np.int64)
    values = np.array([math.nan if v is None else v for _, v in pairs], dtype=float)
    return steps, values


def _finite(steps: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep = np.isfinite(values)
    return steps[keep], values[keep]


def _last(records: Sequence[Mapping[str, Any]], key: str) -> float | int | None:
    """Latest finite numeric value of ``key`` (records sorted by step), keeping ints as ints."""
    for record in reversed(records):
        value = record.get(key)
        number = _num(value)
        if number is not None and math.isfinite(number):
            return value
    return None


def steady_state_start(steps: np.ndarray, warmup_frac: float = WARMUP_FRAC) -> float:
    """First step counted as steady state: ``min + warmup_frac * (max - min)`` of the logged steps.

    Args:
        steps: Logged steps (non-empty).
        warmup_frac: Fraction of the step range treated as warm-up.

    Returns:
        The threshold; steps ``>=`` it are steady state.
    """
    lo, hi = float(np.min(steps)), float(np.max(steps))
    return lo + warmup_frac * (hi - lo)


def _steady_median(steps: np.ndarray, values: np.ndarray) -> tuple[float | None, float | None]:
    """``(median over steady-state finite values, steady-state start step)``."""
    if len(steps) == 0:
        return None, None
    start = steady_state_start(steps)
    keep = (steps >= start) & np.isfinite(values)
    return (float(np.median(values[keep])) if keep.any() else None), start


def ema(values: np.ndarray, beta: float | None = None) -> np.ndarray:
    """Bias-corrected exponential moving average, used to smooth the loss curve.

    Args:
        values: 1-D finite values.
        beta: Decay in ``[0, 1)``. Default scales with length (window ~ n/50, at most 100 points) so short
            and long runs get comparably smooth curves.

    Returns:
        Array of the same length.
    """
    n = len(values)
    if beta is None:
        beta = 1.0 - 1.0 / min(max(n // 50, 1), 100)
    out = np.empty(n, dtype=float)
    acc = 0.0
    for i, v in enumerate(values):
        acc = beta * acc + (1.0 - beta) * float(v)
        # Bias correction: without it the curve starts near 0 instead of at the first value.
        out[i] = acc / (1.0 - beta ** (i + 1))
    return out


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of eval metric ``metric`` is better (False for losses, errors, timings)."""
    return not _LOWER_IS_BETTER.search(metric.rsplit("/", 1)[-1])


def is_score(metric: str) -> bool:
    """Whether eval metric ``metric`` is a score to rank and plot (False for counts such as ``zeroshot/n``)."""
    return not _NOT_SCORE.match(metric.rsplit("/", 1)[-1])


# ----------------------------------------------------------------------------- summary


def summarize(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Compute the headline numbers of a run.

    Args:
        records: Parsed metrics records (any order, any kinds; unknown kinds are ignored).

    Returns:
        A dict with keys ``num_records``, ``num_train_records``, ``num_eval_records``, ``steps``
        (largest step logged), ``wall_time_s``, ``final_loss``/``final_loss_step`` (last finite loss),
        ``min_loss``/``min_loss_step``, ``nan_loss_steps`` (train records whose loss is not finite),
        ``median_samples_per_s`` (steady state, see :func:`steady_state_start`) and
        ``steady_state_from_step``, ``mean_data_wait_frac`` (all train records), ``samples``,
        ``epoch``, ``bad_samples``, ``final_lr``, ``final_logit_scale``, ``final_logit_bias``, ``negatives``
        (each sample's negatives in a contrastive loss),
        ``eval`` (metric -> ``{"final", "final_step", "best", "best_step", "higher_is_better"}``) and
        ``summary`` (the last ``"summary"`` record without ``kind``/``time``, or ``{}``).
        Numbers that cannot be computed are None.
    """
    train = _by_kind(records, "train")
    evals = _by_kind(records, "eval")
    out: dict[str, Any] = {
        "num_records": len(records),
        "num_train_records": len(train),
        "num_eval_records": len(evals),
    }
    out.update(_progress_stats(records, train))
    out.update(_loss_stats(train))
    out.update(_throughput_stats(train))
    out["eval"] = _eval_stats(evals)
    out["summary"] = _summary_record(records)
    return out


def _progress_stats(records: Sequence[Mapping[str, Any]], train: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    steps = [s for s in map(_step, records) if s is not None]
    times = [t for t in (_num(r.get("time")) for r in records) if t is not None and math.isfinite(t)]
    return {
        "steps": max(steps) if steps else None,
        # Spans resume gaps too; it is the time from first to last log line.
        "wall_time_s": max(times) - min(times) if times else None,
        "samples": _last(train, "samples"),
        "epoch": _last(train, "epoch"),
        "bad_samples": _last(train, "bad_samples"),
        "final_lr": _last(train, "lr"),
        "final_logit_scale": _last(train, "logit_scale"),
        "final_logit_bias": _last(train, "logit_bias"),
        "negatives": _last(train, "negatives"),
    }


def _loss_stats(train: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    steps, loss = _series(train, "loss")
    out: dict[str, Any] = {"nan_loss_steps": int(np.count_nonzero(~np.isfinite(loss)))}
    steps, loss = _finite(steps, loss)
    if len(loss) == 0:
        return out | {"final_loss": None, "final_loss_step": None, "min_loss": None, "min_loss_step": None}
    best = int(np.argmin(loss))
    return out | {
        "final_loss": float(loss[-1]),
        "final_loss_step": int(steps[-1]),
        "min_loss": float(loss[best]),
        "min_loss_step": int(steps[best]),
    }


def _throughput_stats(train: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    median, start = _steady_median(*_series(train, "samples_per_s"))
    _, wait = _finite(*_series(train, "data_wait_frac"))
    return {
        "median_samples_per_s": median,
        "steady_state_from_step": start,
        "mean_data_wait_frac": float(np.mean(wait)) if len(wait) else None,
    }


def _eval_stats(evals: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Final and best value per eval metric; metrics are the numeric keys with an evaluator prefix."""
    stats: dict[str, dict[str, Any]] = {}
    for record in evals:
        step = _step(record)
        for key, raw in record.items():
            value = _num(raw)
            if "/" not in key or value is None:
                continue
            entry = stats.setdefault(key, _new_eval_entry(key))
            # Records are sorted by step, so the last one seen is the latest.
            entry["final"], entry["final_step"] = value, step
            if entry["score"] and math.isfinite(value) and _improves(value, entry["best"], entry["higher_is_better"]):
                entry["best"], entry["best_step"] = value, step
    return dict(sorted(stats.items()))


def _new_eval_entry(metric: str) -> dict[str, Any]:
    return {
        "final": None,
        "final_step": None,
        "best": None,
        "best_step": None,
        "higher_is_better": higher_is_better(metric),
        "score": is_score(metric),  # False: a count or a chosen value, shown but never ranked
    }


def _improves(value: float, best: float | None, higher: bool) -> bool:
    # Strict comparison so ties keep the earliest step.
    return best is None or (value > best if higher else value < best)


def _summary_record(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    for record in reversed(records):
        if record.get("kind") == "summary":
            return {k: v for k, v in record.items() if k not in ("kind", "time")}
    return {}


# ----------------------------------------------------------------------------- plots


def _figure(rows: int = 1) -> tuple[Any, list[Any]]:
    """A figure with ``rows`` stacked panels sharing the x axis.

    Builds the Figure with an explicit Agg canvas instead of going through pyplot, so no global
    backend is switched and nothing is left registered in pyplot's figure manager.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(_PANEL_SIZE[0], _PANEL_SIZE[1] * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    return fig, list(axes)


def _style(ax: Any, title: str, ylabel: str, xlabel: str | None = "step") -> None:
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    if xlabel:
        ax.set_xlabel(xlabel)
    ax.grid(True, alpha=0.3)
    handles, _ = ax.get_legend_handles_labels()
    if len(handles) > 6:
        # Many lines (e.g. eval metrics): keep the legend off the data.
        ax.legend(fontsize="x-small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    elif handles:
        ax.legend(fontsize="small")


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def _plot_loss(train: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    steps, loss = _series(train, "loss")
    bad = ~np.isfinite(loss)
    x, y = _finite(steps, loss)
    if len(y) == 0:
        return None
    fig, (ax,) = _figure()
    ax.plot(x, y, lw=0.8, alpha=0.35, color="tab:blue", label="raw")
    ax.plot(x, ema(y), lw=1.6, color="tab:blue", label="EMA")
    if bad.any():
        # Rug at the bottom so divergence is visible even though those points cannot be drawn.
        ax.plot(
            steps[bad],
            np.full(int(bad.sum()), y.min()),
            "|",
            color="tab:red",
            ms=10,
            label=f"non-finite ({int(bad.sum())})",
        )
    _style(ax, "Training loss", "loss")
    return _save(fig, path)


def _plot_lr(train: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    keys = sorted({k for r in train for k in r if k == "lr" or k.startswith("lr/")})
    lines = [(k, *_finite(*_series(train, k))) for k in keys]
    lines = [line for line in lines if len(line[1])]
    if not lines:
        return None
    fig, (ax,) = _figure()
    for key, x, y in lines:
        ax.plot(x, y, lw=1.2, label=key)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    _style(ax, "Learning rate", "lr")
    return _save(fig, path)


def _plot_logit(train: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    panels = [(k, *_finite(*_series(train, k))) for k in ("logit_scale", "logit_bias")]
    panels = [p for p in panels if len(p[1])]
    if not panels:
        return None
    # Separate panels: scale (~1..100) and bias (~-10) on one axis would flatten both.
    fig, axes = _figure(len(panels))
    for i, (ax, (key, x, y)) in enumerate(zip(axes, panels, strict=True)):
        ax.plot(x, y, lw=1.2, color=f"C{i}")
        _style(ax, key.replace("_", " ").capitalize(), key, "step" if i == len(panels) - 1 else None)
    return _save(fig, path)


def _plot_throughput(train: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    steps, sps = _series(train, "samples_per_s")
    median, start = _steady_median(steps, sps)
    x, y = _finite(steps, sps)
    if len(y) == 0:
        return None
    fig, (ax,) = _figure()
    ax.plot(x, y, lw=0.9, label="samples/s")
    if start is not None and start > x.min():
        ax.axvspan(x.min(), start, color="gray", alpha=0.12, label="warm-up")
    if median is not None:
        ax.axhline(median, ls="--", color="tab:orange", label=f"steady median {median:,.1f}")
    ax.set_ylim(bottom=0)
    _style(ax, "Throughput", "samples / s")
    return _save(fig, path)


def _plot_data_wait(train: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    x, y = _finite(*_series(train, "data_wait_frac"))
    if len(y) == 0:
        return None
    fig, (ax,) = _figure()
    ax.plot(x, y, lw=0.9, label="data wait")
    ax.axhline(float(np.mean(y)), ls="--", color="tab:orange", label=f"mean {np.mean(y):.1%}")
    ax.set_ylim(bottom=0)
    _style(ax, "Fraction of step time waiting for data", "fraction")
    return _save(fig, path)


def _plot_eval(evals: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    metrics = {m: e for m, e in _eval_stats(evals).items() if e["score"]}  # counts would flatten the scores' axis
    groups = [[m for m, e in metrics.items() if e["higher_is_better"] is up] for up in (True, False)]
    panels = [(title, g) for title, g in zip(("higher is better", "lower is better"), groups, strict=True) if g]
    if not panels:
        return None
    # Losses and accuracies live on different scales, so they get separate panels.
    fig, axes = _figure(len(panels))
    for i, (ax, (title, names)) in enumerate(zip(axes, panels, strict=True)):
        for name in names:
            x, y = _finite(*_series(evals, name))
            ax.plot(x, y, marker="o", ms=3, lw=1.2, label=name)
        _style(ax, f"Evaluation ({title})", "value", "step" if i == len(panels) - 1 else None)
    return _save(fig, path)


_PLOTTERS = (
    ("loss", "train", _plot_loss),
    ("lr", "train", _plot_lr),
    ("logit_scale", "train", _plot_logit),
    ("samples_per_s", "train", _plot_throughput),
    ("data_wait", "train", _plot_data_wait),
    ("eval", "eval", _plot_eval),
)


def make_plots(records: Sequence[Mapping[str, Any]], plots_dir: str | Path) -> dict[str, Path]:
    """Write every plot for which data exists into ``plots_dir``.

    Stale generated plots from a previous call that no longer apply are removed. A plot that fails
    is logged and skipped, because losing the whole end-of-run report to one bad plot is worse.

    Args:
        records: Parsed metrics records.
        plots_dir: Output directory (created on first plot).

    Returns:
        Plot name (e.g. ``"loss"``) -> PNG path, in report order.
    """
    plots_dir = Path(plots_dir)
    by_kind = {"train": _by_kind(records, "train"), "eval": _by_kind(records, "eval")}
    written: dict[str, Path] = {}
    for name, kind, plotter in _PLOTTERS:
        path = plots_dir / f"{name}.png"
        try:
            result = plotter(by_kind[kind], path)
        except Exception:  # noqa: BLE001 - see docstring
            log.warning("could not draw %s", path, exc_info=True)
            result = None
        if result is None:
            path.unlink(missing_ok=True)
        else:
            written[name] = result
    return written


# ----------------------------------------------------------------------------- markdown


def fmt(value: Any) -> str:
    """Format a table value: ints with thousands separators, floats to 4 significant digits."""
    if value is None:
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, int | float):
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        return text.replace("|", "\\|").replace("\n", " ")
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return str(value)
    if abs(value) >= 1000:
        return f"{value:,.1f}"
    if value != 0 and abs(value) < 1e-3:
        return f"{value:.3e}"
    return f"{value:.4g}"


def fmt_duration(seconds: float | None) -> str:
    """Format seconds as ``1h 02m 03s`` (or ``12.3s`` under a minute)."""
    if seconds is None:
        return "n/a"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def _at_step(value: Any, step: Any) -> str:
    return fmt(value) if value is None or step is None else f"{fmt(value)} (step {fmt(step)})"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _summary_md(stats: Mapping[str, Any], skipped: int) -> str:
    wait = stats["mean_data_wait_frac"]
    start = stats["steady_state_from_step"]
    rows = [
        ("Steps", fmt(stats["steps"])),
        ("Samples seen", fmt(stats["samples"])),
        ("Epochs", fmt(stats["epoch"])),
        ("Wall time", fmt_duration(stats["wall_time_s"])),
        ("Final loss", _at_step(stats["final_loss"], stats["final_loss_step"])),
        ("Min loss", _at_step(stats["min_loss"], stats["min_loss_step"])),
        ("Non-finite loss steps", fmt(stats["nan_loss_steps"])),
        ("Median samples/s (steady state)", _steady_label(stats["median_samples_per_s"], start)),
        ("Mean data-wait fraction", "n/a" if wait is None else f"{wait:.1%}"),
        ("Bad samples", fmt(stats["bad_samples"])),
        ("Final lr", fmt(stats["final_lr"])),
        ("Final logit scale", fmt(stats["final_logit_scale"])),
    ]
    if stats.get("negatives") is not None:
        rows.append(("Negatives per sample in the loss", fmt(stats["negatives"])))
    if stats["final_logit_bias"] is not None:
        rows.append(("Final logit bias", fmt(stats["final_logit_bias"])))
    if stats["summary"].get("params/trainable") is not None:
        rows.append(("Trainable parameters", _params_label(stats["summary"])))
    rows.append(("Metrics records (unparseable lines skipped)", f"{stats['num_records']:,} ({skipped:,})"))
    return "## Summary\n\n" + _table(("", "value"), rows)


def _params_label(summary: Mapping[str, Any]) -> str:
    """'12,345 of 1,234,567 (1.00% of the model; 0.80% of the tower's 1,200,000)' from the summary's params/ keys."""
    s = summary
    label = f"{s['params/trainable']:,} of {s['params/total']:,} ({s['params/trainable_share']:.2%}"
    if s.get("params/tower") is not None:
        label += f" of the model; {s['params/tower_trainable_share']:.2%} of the tower's {s['params/tower']:,}"
    return label + ")"


def _steady_label(median: float | None, start: float | None) -> str:
    if median is None:
        return "n/a"
    return f"{median:,.1f} (steps ≥ {start:,.0f})"


def _eval_md(metrics: Mapping[str, Mapping[str, Any]]) -> str:
    if not metrics:
        return ""
    rows = [
        (
            f"{fmt(name)} {('↑' if e['higher_is_better'] else '↓') if e['score'] else '(count)'}",
            fmt(e["final"]),
            fmt(e["final_step"]),
            fmt(e["best"]) if e["score"] else "",
            fmt(e["best_step"]) if e["score"] else "",
        )
        for name, e in sorted(metrics.items(), key=lambda item: not item[1]["score"])  # scores first, counts after
    ]
    return "## Evaluation\n\n" + _table(("metric", "final", "step", "best", "best step"), rows)


def _run_summary_md(summary: Mapping[str, Any]) -> str:
    if not summary:
        return ""
    rows = [(fmt(k), fmt(v)) for k, v in summary.items()]
    return "## Final summary record\n\n" + _table(("key", "value"), rows)


_SOURCE_KEY = re.compile(r"^data/(.+)/(samples|bad)$")


def _sources_md(records: Sequence[Mapping[str, Any]], run_dir: Path) -> str:
    """A mixture's sources: configured share (``data.train`` weights in config.yaml), raw samples read, the share
    they make, bad samples, from the last record that counts them (the summary, else the last train record)."""
    counted = [r for r in records if r.get("kind") in ("summary", "train") and any(map(_SOURCE_KEY.match, r))]
    if not counted:
        return ""
    last = next((r for r in reversed(counted) if r.get("kind") == "summary"), counted[-1])
    counts: dict[str, dict[str, float]] = {}
    for key, value in last.items():
        match = _SOURCE_KEY.match(key)
        if match and _num(value) is not None:
            counts.setdefault(match.group(1), {})[match.group(2)] = float(value)
    weights: dict[str, float] = {}
    path = run_dir / CONFIG_FILE
    if path.is_file():
        import yaml

        train = ((yaml.safe_load(path.read_text()) or {}).get("data") or {}).get("train")
        if isinstance(train, list):
            total = sum(float(e.get("weight", 1.0)) for e in train)
            weights = {str(e.get("name")): float(e.get("weight", 1.0)) / total for e in train if e.get("name")}
    read = sum(c.get("samples", 0.0) for c in counts.values()) or 1.0
    rows = [
        (
            fmt(name),
            f"{weights[name]:.3f}" if name in weights else "n/a",
            fmt(int(c.get("samples", 0))),
            f"{c.get('samples', 0.0) / read:.3f}",
            fmt(int(c.get("bad", 0))),
        )
        for name, c in counts.items()
    ]
    note = (
        f"Raw samples drawn from each source up to step {fmt(last.get('step'))}, all ranks (bad samples included: "
        "the weights apply to draws)."
    )
    return (
        "## Data sources\n\n"
        + note
        + "\n\n"
        + _table(("source", "weight", "samples read", "share read", "bad samples"), rows)
    )


def _image_md(caption: str, rel: str) -> str:
    # Percent-encode so file names with spaces or parentheses still render as links.
    return f"![{caption}]({quote(rel)})"


def _plots_md(plots: Mapping[str, Path], run_dir: Path) -> str:
    if not plots:
        return ""
    body = "\n\n".join(_image_md(name, path.relative_to(run_dir).as_posix()) for name, path in plots.items())
    return "## Plots\n\n" + body


def _sections_md(sections: Mapping[str, str]) -> str:
    return "\n\n".join(f"## {heading}\n\n{body.strip()}" for heading, body in sections.items())


def _images_md(placed: Mapping[str, str | None], sources: Mapping[str, Path]) -> str:
    if not placed:
        return ""
    parts = [
        f"### {caption}\n\n" + (_image_md(caption, rel) if rel else f"_missing image: `{sources[caption]}`_")
        for caption, rel in placed.items()
    ]
    return "## Figures\n\n" + "\n\n".join(parts)


def _config_md(run_dir: Path) -> str:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return ""
    text = path.read_text(encoding="utf-8", errors="replace").rstrip()
    # A fence longer than any backtick run inside the text cannot be closed early.
    runs = re.findall(r"`+", text)
    fence = "`" * max(3, max((len(r) for r in runs), default=0) + 1)
    return f"## Config\n\n<details>\n<summary>{CONFIG_FILE}</summary>\n\n{fence}yaml\n{text}\n{fence}\n\n</details>"


# ----------------------------------------------------------------------------- extra images


def _place_images(images: Mapping[str, str | Path], run_dir: Path, taken: set[str]) -> dict[str, str | None]:
    """Caption -> link relative to ``run_dir`` (None if the file is missing), copying outside files in."""
    placed: dict[str, str | None] = {}
    root = run_dir.resolve()
    for caption, src in images.items():
        src = Path(src).resolve()
        if not src.is_file():
            log.warning("report image %r not found: %s", caption, src)
            placed[caption] = None
        elif src.is_relative_to(root):
            placed[caption] = src.relative_to(root).as_posix()
        else:
            dest = _free_name(run_dir / PLOTS_DIR, src.name, taken)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)
            placed[caption] = dest.relative_to(run_dir).as_posix()
    return placed


def _free_name(folder: Path, name: str, taken: set[str]) -> Path:
    """``folder/name``, suffixed ``_1``, ``_2``... if the name is already used in this report."""
    stem, suffix = Path(name).stem, Path(name).suffix
    candidate, i = name, 0
    while candidate in taken:
        i += 1
        candidate = f"{stem}_{i}{suffix}"
    taken.add(candidate)
    return folder / candidate


# ----------------------------------------------------------------------------- entry points


def write_report(
    run_dir: str | Path,
    title: str | None = None,
    sections: dict[str, str] | None = None,
    images: dict[str, Path] | None = None,
) -> Path:
    """Write ``run_dir/report.md`` and ``run_dir/plots/*.png`` from ``run_dir/metrics.jsonl``.

    Args:
        run_dir: Existing run directory.
        title: Report title; defaults to the run directory's name.
        sections: Extra sections appended after the plots, heading -> markdown body.
        images: Extra images, caption -> path; files outside ``run_dir`` are copied into ``plots/``.

    Returns:
        Path of the written report.

    Raises:
        NotADirectoryError: If ``run_dir`` is not a directory.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise NotADirectoryError(f"run directory not found: {run_dir}")
    records, skipped = read_metrics(run_dir / METRICS_FILE)
    if skipped:
        log.warning("skipped %d unparseable line(s) in %s", skipped, run_dir / METRICS_FILE)
    stats = summarize(records)
    plots = make_plots(records, run_dir / PLOTS_DIR)
    placed = _place_images(images or {}, run_dir, {p.name for p in plots.values()})
    parts = [
        f"# {title or run_dir.resolve().name}",
        _header_md(run_dir),
        _summary_md(stats, skipped),
        _eval_md(stats["eval"]),
        _sources_md(records, run_dir),
        _run_summary_md(stats["summary"]),
        _plots_md(plots, run_dir),
        _sections_md(sections or {}),
        _images_md(placed, {k: Path(v) for k, v in (images or {}).items()}),
        _config_md(run_dir),
    ]
    return _atomic_write(run_dir / REPORT_FILE, "\n\n".join(p for p in parts if p) + "\n")


def _header_md(run_dir: Path) -> str:
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"_Generated {now} from `{run_dir / METRICS_FILE}`._"


def _atomic_write(path: Path, text: str) -> Path:
    # Write-then-rename so a reader (or a concurrent regeneration) never sees a half-written report.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
