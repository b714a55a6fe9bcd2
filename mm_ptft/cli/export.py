"""``mm-ptft export``, ``mm-ptft clip-benchmark`` and ``mm-ptft data``: models and data for other tools."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mm_ptft.cli.base import COMMANDS


@COMMANDS.register("export")
def cmd_export(argv: list[str]) -> int:
    """Export a trained model to timm, transformers, open_clip and ONNX (checked against the model's outputs).

    mm-ptft export SOURCE --out DIR [--to timm transformers open_clip onnx | all] [--config X] [--overwrite]
                   [--no-verify] [--opset N] [overrides…]
    """
    from mm_ptft.config import load_config
    from mm_ptft.export import check_targets, export_model, summary_text

    p = argparse.ArgumentParser(prog="mm-ptft export", description=cmd_export.__doc__.split("\n")[0])
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
    print(summary_text(manifest, out))
    return 0


@COMMANDS.register("clip-benchmark")
def cmd_clip_benchmark(argv: list[str]) -> int:
    """Run CLIP_benchmark's own CLI with an ``mm_ptft`` model type (any mm-ptft checkpoint).

    ``--model`` is anything ``mm-ptft eval --model`` takes; ``--pretrained`` a free label (or a YAML config to use
    instead of the saved one). ``--model_type mm_ptft`` and ``--pretrained mm_ptft`` are added when not given.
    """
    from mm_ptft.export.clip_benchmark import MODEL_TYPE, register

    register()
    from clip_benchmark import cli

    argv = list(argv)
    if argv[:1] == ["eval"]:
        # defaults that name open_clip models would otherwise apply: an mm_ptft model type, and a label instead of
        # CLIP_benchmark's default 'laion400m_e32' (which would end up in the results' names)
        for flag in ("--model_type", "--pretrained"):
            if not any(a == flag or a.startswith(f"{flag}=") for a in argv):
                argv += [flag, MODEL_TYPE]
    saved = sys.argv
    sys.argv = ["clip_benchmark", *argv]  # its parser reads sys.argv
    try:
        cli.main()
    finally:
        sys.argv = saved
    return 0


@COMMANDS.register("data")
def cmd_data(argv: list[str]) -> int:
    """Write or verify webdataset shards (the data_tools package)."""
    import data_tools

    return data_tools.main(argv)
