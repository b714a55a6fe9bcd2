"""``mm-ptft eval``, ``mm-ptft wise-ft``, ``mm-ptft diff`` and ``mm-ptft report``: looking at trained models."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mm_ptft.cli.base import COMMANDS, config_or_saved


@COMMANDS.register("eval")
def cmd_eval(argv: list[str]) -> int:
    """Evaluate trained weights on held-out shards, on one process, without DeepSpeed.

    mm-ptft eval --model runs/pretrain-fmnist [--config X] [eval.data=data/fmnist eval.evaluators=[zeroshot]]
                 [--out results.json] [--out-dir DIR]

    The model's config comes from the run (``config.yaml`` beside the weights) unless ``--config`` is given; the
    results are printed and written as JSON with CLIP_benchmark's metric names. The JSON's ``results`` hold one
    record per evaluator in CLIP_benchmark's layout (dataset, model, pretrained, task, metrics, language);
    ``--out-dir`` writes each as its own file under CLIP_benchmark's default name, so ``clip_benchmark build``
    tables them beside published results.
    """
    import torch

    from mm_ptft import checkpoint as ckpt
    from mm_ptft.config import load_config
    from mm_ptft.eval import clip_benchmark_filename, clip_benchmark_records, evaluate_model
    from mm_ptft.tasks import load_trained

    p = argparse.ArgumentParser(prog="mm-ptft eval", description=cmd_eval.__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="run dir, checkpoint dir, or .safetensors with config.yaml beside")
    p.add_argument("--config", "-c", help="config to use instead of the one saved with the model")
    p.add_argument("--out", help="write the metrics as JSON here")
    p.add_argument("--out-dir", help="also write one CLIP_benchmark result file per evaluator into this directory")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.data=data/fmnist")
    args = p.parse_args(argv)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    cfg = load_config(args.config, args.overrides) if args.config else None
    cfg, task = load_trained(args.model, cfg, args.overrides)
    t0 = time.perf_counter()
    metrics = evaluate_model(cfg, task)
    from mm_ptft.data import resolve_shards

    dataset = (
        resolve_shards(cfg.eval.data, cfg.eval.split, cfg.data.remote).meta.get("name") or Path(cfg.eval.data).name
    )
    records = clip_benchmark_records(metrics, dataset, cfg.train.name or Path(args.model).stem, str(args.model))
    result = {
        "model": str(args.model),
        "dataset": cfg.eval.data,
        "metrics": metrics,
        "eval_time_s": time.perf_counter() - t0,
        "results": records,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        ckpt.atomic_write_text(Path(args.out), text + "\n")
    if args.out_dir:
        for record in records:
            ckpt.atomic_write_text(Path(args.out_dir) / clip_benchmark_filename(record), json.dumps(record) + "\n")
    return 0


def _alphas(text: str) -> list[float]:
    try:
        values = [float(a) for a in text.split(",") if a.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"alphas must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one alpha")
    return values


@COMMANDS.register("wise-ft")
def cmd_wise_ft(argv: list[str]) -> int:
    """WiSE-FT: evaluate interpolations of a run's zero-shot and fine-tuned classifier weights.

    mm-ptft wise-ft runs/finetune-fmnist [--alphas 0,0.25,0.5,0.75,1] [--weights best|final] [--out DIR]
                    [eval.split=test …]

    Writes ``wise_ft.json``, ``wise_ft.md`` and ``wise_ft.png`` (default: ``<run>/wise_ft/``).
    """
    from mm_ptft.analysis.wise_ft import DEFAULT_ALPHAS, run_config, wise_ft, write_outputs

    p = argparse.ArgumentParser(prog="mm-ptft wise-ft", description=cmd_wise_ft.__doc__.split("\n")[0])
    p.add_argument("run", help="a finished classification run with finetune.head_init=zeroshot")
    p.add_argument("--alphas", type=_alphas, default=list(DEFAULT_ALPHAS), help="comma-separated, e.g. 0,0.5,1")
    p.add_argument("--weights", choices=["best", "final"], default="best", help="θ_ft: best.safetensors or final")
    p.add_argument("--out", help="output directory (default: <run>/wise_ft)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.split=test eval.data=data/fmnist")
    args = p.parse_intermixed_args(argv)  # overrides may follow the options
    rows, source = wise_ft(args.run, args.alphas, args.weights, args.overrides)
    cfg = run_config(Path(args.run), args.overrides)
    out = Path(args.out) if args.out else Path(args.run) / "wise_ft"
    meta = {"run": args.run, "finetuned": str(source), "eval_data": cfg.eval.data, "eval_split": cfg.eval.split}
    write_outputs(rows, out, meta)
    print(f"wrote {out / 'wise_ft.md'}, {out / 'wise_ft.json'}, {out / 'wise_ft.png'}")
    return 0


@COMMANDS.register("diff")
def cmd_diff(argv: list[str]) -> int:
    """Per-layer weight change and CKA between a pretrained and a fine-tuned tower.

    mm-ptft diff runs/pretrain-fmnist runs/finetune-fmnist --probe data/fmnist [--tower image|text]
                 [--split test] [--max-samples 500] [--out DIR] [-c CONFIG] [overrides…]
    """
    import torch

    from mm_ptft import checkpoint as ckpt
    from mm_ptft.analysis.diff import diff_towers, plot_diff

    p = argparse.ArgumentParser(prog="mm-ptft diff", description=cmd_diff.__doc__.split("\n")[0])
    p.add_argument("a", help="reference weights (e.g. the pretraining run)")
    p.add_argument("b", help="weights to compare (e.g. a fine-tuned run)")
    p.add_argument("--probe", required=True, help="probe data: a dataset dir or shard pattern")
    p.add_argument("--tower", choices=["image", "text"], default="image")
    p.add_argument("--split", default="test", help="split of a dataset dir to probe with")
    p.add_argument("--max-samples", type=int, default=500, help="probe samples (CKA costs O(n²) memory)")
    p.add_argument("--out", help="output directory (default: <b>/diff if b is a directory, else ./diff)")
    p.add_argument("--config", "-c", help="config for the tower (default: the one saved with A, else B)")
    p.add_argument("overrides", nargs="*", help="dotted overrides of that config")
    args = p.parse_intermixed_args(argv)  # overrides may follow the options
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    cfg = config_or_saved([args.a, args.b], args.config, args.overrides)
    result = diff_towers(args.a, args.b, args.probe, cfg, args.tower, args.split, args.max_samples)
    out = Path(args.out) if args.out else (Path(args.b) / "diff" if Path(args.b).is_dir() else Path("diff"))
    out.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_text(out / "diff.json", json.dumps(result, indent=1) + "\n")
    plot_diff(result, out / "diff.png")
    for r in result["weight_change"]:
        print(f"{r['group']:>12}  relative change {r['relative_change']:.4f}")
    for c in result["cka"]:
        print(f"{c['layer']:>12}  CKA {c['cka']:.4f}")
    print(f"wrote {out / 'diff.json'} and {out / 'diff.png'}")
    return 0


@COMMANDS.register("report")
def cmd_report(argv: list[str]) -> int:
    """(Re)write a run's report.md and plots from its metrics.jsonl (e.g. for a run that was killed)."""
    import logging

    from mm_ptft.config import ConfigError
    from mm_ptft.report import write_report

    p = argparse.ArgumentParser(prog="mm-ptft report", description=cmd_report.__doc__)
    p.add_argument("run_dir", type=Path, help="run directory containing metrics.jsonl")
    p.add_argument("--title", default=None, help="report title (default: the directory name)")
    args = p.parse_args(argv)
    if not args.run_dir.is_dir():
        raise ConfigError(f"report: not a directory: {args.run_dir}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(write_report(args.run_dir, title=args.title))
    return 0
