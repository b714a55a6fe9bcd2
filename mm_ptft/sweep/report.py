"""The sweep's report: ``OUT/report.md`` (settings, the chosen config and its test score, every trial) and
``OUT/plots/*.png`` (value per trial, best per policy, the validation curves the pruner saw), drawn with matplotlib."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mm_ptft.sweep.space import SearchSpace, short_value

if TYPE_CHECKING:
    import optuna

PLOTS = "plots"
STATE_STYLE = {"COMPLETE": ("tab:green", "o"), "PRUNED": ("tab:orange", "x"), "FAIL": ("tab:red", "v")}


def _minutes(t: optuna.trial.FrozenTrial) -> float | None:
    if "minutes" in t.user_attrs:
        return float(t.user_attrs["minutes"])
    if t.datetime_start and t.datetime_complete:
        return (t.datetime_complete - t.datetime_start).total_seconds() / 60
    return None


def _note(t: optuna.trial.FrozenTrial, requeued: set[int]) -> str:
    notes = []
    if t.state.name == "PRUNED" and t.user_attrs.get("pruned_at") is not None:
        notes.append(f"pruned at step {t.user_attrs['pruned_at']}")
    if "requeued_from" in t.user_attrs:
        notes.append(f"re-run of trial {t.user_attrs['requeued_from']}")
    if t.number in requeued:
        notes.append("interrupted (sweep killed), re-queued")
    elif t.state.name == "FAIL" and t.user_attrs.get("error"):
        notes.append(str(t.user_attrs["error"]).replace("|", "\\|")[:160])
    return "; ".join(notes)


def trial_table(study: optuna.Study, space: SearchSpace, metric: str) -> list[str]:
    """Markdown rows of every trial: number, state, value, each parameter (blank where inactive), minutes, note."""
    keys = [p.key for p in space.params]
    requeued = {
        t.user_attrs["requeued_from"] for t in study.get_trials(deepcopy=False) if "requeued_from" in t.user_attrs
    }
    head = ["trial", "state", f"{metric} (val)", *(f"`{k}`" for k in keys), "last step", "minutes", "note"]
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---:", "---", "---:", *(["---"] * len(keys)), "---:", "---:", "---"]) + "|",
    ]
    for t in study.get_trials(deepcopy=False):
        value = "" if t.value is None else f"{t.value:.4f}"
        params = [short_value(t.params[k]) if k in t.params else "" for k in keys]
        minutes = None if t.number in requeued else _minutes(t)  # an interrupted run's time is not known
        row = [
            str(t.number),
            t.state.name,
            value,
            *params,
            str(t.user_attrs.get("last_step", "")),
            "" if minutes is None else f"{minutes:.1f}",
            _note(t, requeued),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _group_best(study: optuna.Study, key: str, maximize: bool) -> dict[Any, tuple[float, int, int]]:
    """Per value of ``key``: (best value, its trial, completed trials) over the completed trials."""
    out: dict[Any, tuple[float, int, int]] = {}
    for t in study.get_trials(deepcopy=False):
        if t.state.name != "COMPLETE" or key not in t.params:
            continue
        best, number, count = out.get(t.params[key], (None, None, 0))
        if best is None or (t.value > best if maximize else t.value < best):
            best, number = t.value, t.number
        out[t.params[key]] = (best, number, count + 1)
    return out


def write_report(
    out: Path,
    study: optuna.Study,
    space: SearchSpace,
    meta: dict[str, Any],
    best: optuna.trial.FrozenTrial | None,
    test: dict | None,
) -> list[Path]:
    """Write ``report.md`` and the plots; returns the files written."""
    metric, maximize = meta["metric"], meta["direction"] == "maximize"
    states = [t.state.name for t in study.get_trials(deepcopy=False)]
    counts = ", ".join(f"{states.count(s)} {s}" for s in sorted(set(states)))
    lines = [
        f"# Sweep {out.name}",
        "",
        f"Base config `{meta['base']}`"
        + (f" with `{' '.join(meta['overrides'])}`" if meta["overrides"] else "")
        + f"; space `{meta['space']}`; {meta['ranks']} rank(s) per trial; study `{out / 'study.db'}`.",
        f"Selection: {meta['direction']} `{metric}` on the validation split (the runs' own evaluations); "
        f"pruner {space.pruner}; TPE {space.sampler} (seed + trial number per trial).",
        f"Budget: {meta['budget']['trials'] or '∞'} trials, {meta['budget']['timeout_min'] or '∞'} min; "
        f"stopped: {meta['stopped']}; {len(states)} trials ({counts}), "
        f"{meta['elapsed_min']:.1f} min of sweep wall time.",
        "",
        "## Space",
        "",
        *(f"- `{p.key}`: {p.describe()}" for p in space.params),
        "",
        "## Chosen config",
        "",
    ]
    if best is None:
        lines.append("No trial completed; nothing was chosen and the test split was not scored.")
    else:
        lines += [
            f"Trial {best.number}: {metric} = {best.value:.4f} on validation; "
            + ", ".join(f"`{k}={short_value(v)}`" for k, v in best.params.items())
            + f". Recipe: `{out / 'best.yaml'}`; weights: `{best.user_attrs.get('run_dir')}/best.safetensors`.",
        ]
        if test is not None:
            shown = ", ".join(
                f"{k} {v:.4f}" for k, v in test["metrics"].items() if isinstance(v, float) and not k.endswith("/n")
            )
            lines.append(
                f"Test split (`{test['data']}`, split `{test['split']}`), scored once, for this config only: {shown}."
            )
    lines += ["", "## Trials", "", *trial_table(study, space, metric), ""]
    group = space.group_key()
    if group is not None:
        per_group = _group_best(study, group, maximize)
        if per_group:
            lines += [
                f"Best per `{group}` (completed trials):",
                "",
                f"| `{group}` | best {metric} | trial | completed |",
                "|---|---:|---:|---:|",
            ]
            lines += [f"| {short_value(k)} | {v:.4f} | {n} | {c} |" for k, (v, n, c) in per_group.items()]
            lines.append("")
    plots = _plots(out / PLOTS, study, space, metric, maximize)
    lines += [f"![{p.stem}]({PLOTS}/{p.name})" for p in plots]
    path = out / "report.md"
    from mm_ptft import checkpoint as ckpt

    ckpt.atomic_write_text(path, "\n".join(lines) + "\n")
    return [path, *plots]


def _plots(folder: Path, study: optuna.Study, space: SearchSpace, metric: str, maximize: bool) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    trials = study.get_trials(deepcopy=False)
    written = []

    # value per trial (a pruned trial at its last reported value), and the best so far
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for state, (color, marker) in STATE_STYLE.items():
        points = [(t.number, t.value) for t in trials if t.state.name == state and t.value is not None]
        if points:
            ax.scatter(*zip(*points), color=color, marker=marker, label=state.lower())
    best, line = None, []
    for t in trials:
        if t.state.name == "COMPLETE":
            best = t.value if best is None else (max if maximize else min)(best, t.value)
        line.append((t.number, best if best is not None else math.nan))
    if line:
        ax.step(*zip(*line), where="post", color="tab:blue", alpha=0.6, label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"{metric} (validation)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(_save(fig, folder / "values.png"))

    # best value per policy (or the space's first categorical parameter)
    group = space.group_key()
    per_group = _group_best(study, group, maximize) if group else {}
    if per_group:
        fig, ax = plt.subplots(figsize=(6.5, 3.6))
        names = [short_value(k) for k in per_group]
        values = [v for v, _, _ in per_group.values()]
        bars = ax.bar(names, values, color="tab:blue")
        for bar, (v, n, c) in zip(bars, per_group.values()):
            ax.annotate(
                f"{v:.4f}\ntrial {n} ({c} done)",
                (bar.get_x() + bar.get_width() / 2, v),
                ha="center",
                va="bottom",
                fontsize=7,
            )
        low = min(values)
        ax.set_ylim(low - 0.1 * (max(values) - low + 1e-3) - 1e-3, max(values) + 0.25 * (max(values) - low + 1e-3))
        ax.set_xlabel(group)
        ax.set_ylabel(f"best {metric} (validation)")
        ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        written.append(_save(fig, folder / "per_policy.png"))

    # the validation curves the pruner judged
    curves = [t for t in trials if t.intermediate_values]
    if curves:
        fig, ax = plt.subplots(figsize=(6.5, 3.6))
        for t in curves:
            steps = sorted(t.intermediate_values)
            style = "--" if t.state.name == "PRUNED" else "-"
            ax.plot(
                steps,
                [t.intermediate_values[s] for s in steps],
                style,
                marker=".",
                alpha=0.8,
                label=f"{t.number} {t.state.name.lower()}",
            )
        ax.set_xlabel("step")
        ax.set_ylabel(f"{metric} (validation)")
        ax.grid(alpha=0.3)
        if len(curves) <= 16:
            ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        written.append(_save(fig, folder / "curves.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
