"""Write a trained model in the formats other libraries load, checked against the model (``mm-ptft export``).

Every target goes to ``DIR/<target>/``; ``DIR/export.json`` lists what was written, the largest difference between
each reloaded export and the mm-ptft model on a fixed input, and why a target was skipped (``--to all`` skips what
the checkpoint cannot give, e.g. open_clip for a model open_clip cannot represent). Everything is written under a
hidden temporary directory beside DIR and renamed into place only when every target has been written and checked,
so a failed or interrupted export leaves no DIR behind (and an existing DIR untouched unless it is replaced whole).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from mm_ptft.export import to_onnx, to_open_clip, to_timm, to_transformers  # noqa: F401 - register the targets
from mm_ptft.export.source import ExportError, ExportSource, load_source
from mm_ptft.export.target import TARGETS

PARTIAL_PREFIX = ".partial-"
MANIFEST = "export.json"


def check_targets(targets: list[str]) -> list[str]:
    """Validate target names (``all`` expands later, against what the checkpoint holds)."""
    names = TARGETS.list()
    for t in targets:
        if t != "all" and t not in TARGETS:
            raise ExportError(f"export: unknown target '{t}'; targets: {', '.join(names)}, all")
    if "all" in targets:
        return ["all"]
    return list(dict.fromkeys(targets))


def _available(src: ExportSource) -> tuple[list[str], dict[str, str]]:
    """Targets this checkpoint can give, and a reason for each one it cannot (each target says)."""
    chosen, skipped = [], {}
    for name in TARGETS.list():
        reason = TARGETS.get(name).unavailable(src)
        if reason is None:
            chosen.append(name)
        else:
            skipped[name] = reason
    return chosen, skipped


def _publish(work: Path, out: Path) -> None:
    """Move the finished export into place; an existing ``out`` is replaced whole, never merged."""
    old = None
    if out.exists():
        old = out.with_name(f"{PARTIAL_PREFIX}old-{out.name}-{uuid.uuid4().hex[:8]}")
        os.replace(out, old)
    os.replace(work, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_model(
    source: str | Path,
    out: str | Path,
    targets: list[str] | None = None,
    cfg=None,
    overrides: list[str] | None = None,
    overwrite: bool = False,
    verify: bool = True,
    opset: int | None = None,
) -> dict:
    """Export a trained model to ``out/<target>/`` for each target, atomically.

    Args:
        source: run directory, checkpoint directory (any ZeRO stage) or weights file (config.yaml beside it).
        out: export directory to create.
        targets: names from :data:`TARGETS`, or ``["all"]`` (default): every target the checkpoint can give.
        cfg: the model's config (default: the one saved with the weights), ``overrides`` applied to a saved one.
        overwrite: replace an existing ``out``.
        verify: reload each export with its library and compare with the model's own outputs.
        opset: ONNX opset (default: the exporter's).

    Returns:
        The manifest written to ``out/export.json``.

    Raises:
        ExportError, CheckpointError, ConfigError: one-line, actionable; nothing is left at ``out``.
    """
    targets = check_targets(list(targets or ["all"]))
    out = Path(out).expanduser().absolute()
    if out.exists() and not overwrite:
        raise ExportError(f"export: {out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise ExportError(f"export: {out} exists and is not a directory")
    source_path = Path(source).expanduser().absolute()
    if source_path == out or out in source_path.parents:
        raise ExportError(f"export: the output {out} would contain (and replace) the source {source_path}")
    src = load_source(source, cfg, overrides)
    skipped: dict[str, str] = {}
    if targets == ["all"]:
        targets, skipped = _available(src)
        if not targets:
            raise ExportError(f"export: nothing to export from {src.path}: " + "; ".join(skipped.values()))
    out.parent.mkdir(parents=True, exist_ok=True)
    for pattern in (f"{PARTIAL_PREFIX}{out.name}-*", f"{PARTIAL_PREFIX}old-{out.name}-*"):  # left by a killed export
        for stale in out.parent.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)
    work = out.with_name(f"{PARTIAL_PREFIX}{out.name}-{uuid.uuid4().hex[:8]}")
    work.mkdir()
    try:
        written = {}
        for name in targets:
            written[name] = TARGETS.get(name).export(src, work / name, out / name, verify, opset)
        manifest = {
            "source": str(src.path),
            "task": src.cfg.task,
            "verified": verify,
            "targets": written,
            "skipped": skipped,
        }
        (work / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _publish(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return manifest


def summary_text(manifest: dict, out: Path) -> str:
    """One line per target: where it was written and the differences checked, or why it was skipped."""
    lines = []
    for name, info in manifest["targets"].items():
        diffs = {k: v for k, v in info.items() if k.startswith("max_abs_diff")}
        flat = []
        for key, value in diffs.items():
            flat += [f"{k}={v:.2g}" for k, v in value.items()] if isinstance(value, dict) else [f"{key}={value:.2g}"]
        checked = f" (checked: {', '.join(flat)})" if flat else ""
        lines.append(f"{name}: {out / name}{checked}")
    lines += [f"{name}: skipped ({reason})" for name, reason in manifest["skipped"].items()]
    return "\n".join(lines)
