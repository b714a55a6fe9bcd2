"""``mm-ptft export``: write a trained model in the formats other libraries load, checked against the model.

    mm-ptft export SOURCE --out DIR [--to timm transformers open_clip onnx | all] [--config X] [--overwrite]
                   [--no-verify] [--opset N] [overrides…]

Every target goes to ``DIR/<target>/``; ``DIR/export.json`` lists what was written, the largest difference between
each reloaded export and the mm-ptft model on a fixed input, and why a target was skipped (``--to all`` skips what
the checkpoint cannot give, e.g. open_clip for a model open_clip cannot represent). Everything is written under a
hidden temporary directory beside DIR and renamed into place only when every target has been written and checked,
so a failed or interrupted export leaves no DIR behind (and an existing DIR untouched unless it is replaced whole).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from mm_ptft.export.source import ExportError, ExportSource, load_source
from mm_ptft.registry import Registry

PARTIAL_PREFIX = ".partial-"
MANIFEST = "export.json"

# name → fn(source, work_dir, final_dir, verify, opset) -> info dict
TARGETS: Registry[Callable[..., dict]] = Registry("export target")


@TARGETS.register("timm")
def _timm(src: ExportSource, work: Path, final: Path, verify: bool, opset: int | None) -> dict:
    from mm_ptft.export.to_timm import export_timm

    return export_timm(src, work, verify)


@TARGETS.register("transformers")
def _transformers(src: ExportSource, work: Path, final: Path, verify: bool, opset: int | None) -> dict:
    from mm_ptft.export.to_transformers import export_transformers

    return export_transformers(src, work, verify)


@TARGETS.register("open_clip")
def _open_clip(src: ExportSource, work: Path, final: Path, verify: bool, opset: int | None) -> dict:
    from mm_ptft.export.to_open_clip import export_open_clip

    return export_open_clip(src, work, final, verify)


@TARGETS.register("onnx")
def _onnx(src: ExportSource, work: Path, final: Path, verify: bool, opset: int | None) -> dict:
    from mm_ptft.export.to_onnx import export_onnx

    return export_onnx(src, work, verify, opset)


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
    """Targets this checkpoint can give, and a reason for each one it cannot."""
    from mm_ptft.export.to_open_clip import unsupported_reasons

    chosen, skipped = [], {}
    for name in TARGETS.list():
        if name in ("timm", "onnx") and not src.has_image:
            skipped[name] = "the checkpoint holds no image tower"
        elif name == "transformers" and not src.has_text:
            skipped[name] = "the checkpoint holds no text tower"
        elif name == "open_clip" and unsupported_reasons(src):
            skipped[name] = "; ".join(unsupported_reasons(src))
        else:
            chosen.append(name)
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
            written[name] = TARGETS.get(name)(src, work / name, out / name, verify, opset)
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


def _summary(manifest: dict, out: Path) -> str:
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


def main(argv: list[str] | None = None) -> int:
    """``mm-ptft export`` command line."""
    from mm_ptft.config import load_config

    p = argparse.ArgumentParser(prog="mm-ptft export", description=__doc__.split("\n")[0])
    p.add_argument("source", help="run dir, checkpoint dir (any ZeRO stage), or .safetensors with config.yaml beside")
    p.add_argument("--out", "-o", required=True, help="export directory (one subdirectory per target)")
    p.add_argument("--to", nargs="+", default=["all"], metavar="TARGET", help="timm transformers open_clip onnx | all")
    p.add_argument("--config", "-c", help="config to use instead of the one saved with the model")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export directory")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip reloading and comparing outputs")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = p.parse_intermixed_args(argv)  # overrides may follow the options
    check_targets(args.to)  # an unknown target fails before any weights are read
    cfg = load_config(args.config, args.overrides) if args.config else None
    out = Path(args.out).expanduser().absolute()
    manifest = export_model(args.source, out, args.to, cfg, args.overrides, args.overwrite, args.verify, args.opset)
    print(_summary(manifest, out))
    return 0
