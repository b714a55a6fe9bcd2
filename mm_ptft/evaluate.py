"""``mm-ptft eval``: evaluate trained weights on held-out shards, on one process, without DeepSpeed.

    mm-ptft eval --model runs/pretrain-fmnist [--config X] [eval.data=data/fmnist eval.evaluators=[zeroshot]]
                 [--out results.json]

The model's config comes from the run (``config.yaml`` beside the weights) unless ``--config`` is given; the
results are printed and written as JSON with CLIP_benchmark's metric names. The JSON's ``results`` hold one record
per evaluator in CLIP_benchmark's layout (dataset, model, pretrained, task, metrics, language); ``--out-dir`` writes
each as its own file under CLIP_benchmark's default name, so ``clip_benchmark build`` tables them beside published
results.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mm_ptft import checkpoint as ckpt
from mm_ptft.config import Config, ConfigError, apply_overrides, config_from_dict, load_config


def load_trained(source: str | Path, cfg: Config | None = None, overrides: list[str] | None = None):
    """(config, task holding the trained fp32 weights) for a run dir, checkpoint dir or weights file."""
    if cfg is None:
        data = ckpt.config_of(source)
        if data is None:
            raise ConfigError(f"config: no config.yaml beside {source}; pass --config")
        cfg = config_from_dict(apply_overrides(data, list(overrides or [])))
    from mm_ptft.finetune.tasks import for_loading
    from mm_ptft.tasks import create_task

    task = create_task(for_loading(cfg))  # the trained weights replace any initialisation
    ckpt.load_model_weights(task.model, ckpt.load_weights(source), what=str(source))
    return cfg, task.eval()


def evaluate_model(cfg: Config, task: torch.nn.Module, device: torch.device | None = None) -> dict[str, float]:
    """Run ``cfg.eval.evaluators`` on ``cfg.eval.data`` in this process (the same evaluators as training)."""
    from mm_ptft.data import EvalStream, make_loader, resolve_shards
    from mm_ptft.eval import check_classnames, read_lines_or_list, run_evaluators
    from mm_ptft.eval.probe import ProbeContext
    from mm_ptft.models import create_tokenizer, tokenize
    from mm_ptft.train.trainer import image_norm_stats

    if not cfg.eval.data:
        raise ConfigError("config: eval.data is required (held-out shards or a data_tools dataset dir)")
    device = device or torch.device("cpu")
    shards = resolve_shards(cfg.eval.data, cfg.eval.split)
    classnames = read_lines_or_list(cfg.eval.classnames, "eval.classnames") or shards.meta.get("classnames")
    templates = read_lines_or_list(cfg.eval.templates, "eval.templates") or shards.meta.get("templates")
    if classnames and templates:
        check_classnames(classnames, templates)
    tok = None
    if cfg.model.text.pretrained or cfg.model.text.tokenizer:
        tokenizer = create_tokenizer(cfg.model.text)

        def tok(texts):
            return tokenize(tokenizer, texts, cfg.model.text.context_length)

    mean, std = image_norm_stats(cfg)
    workers = min(cfg.data.workers, 1)

    def batches(shards=shards):
        stream = EvalStream(
            shards,
            task.decoder(cfg, False, mean, std),
            task.collator(tok),
            cfg.eval.batch_size,
            0,
            1,
            max(workers, 1),
            cfg.eval.max_samples,
        )
        return make_loader(stream, workers, cfg.data.prefetch)

    train_batches = None
    if "linear_probe" in cfg.eval.evaluators:  # the probe fits on the train split of the same dataset
        train_shards = resolve_shards(cfg.eval.data, "train")

        def train_batches():
            return batches(train_shards)

    task = task.to(device).eval()
    ctx = ProbeContext(task, tok, batches, lambda: task.dummy_batch(cfg, tok), device, classnames, templates)
    ctx.train_batches = train_batches
    with torch.no_grad():
        return run_evaluators(cfg.eval.evaluators, ctx)


# evaluator → CLIP_benchmark task name (evaluators it has no counterpart for keep their own name)
CLIP_BENCHMARK_TASKS = {
    "zeroshot": "zeroshot_classification",
    "retrieval": "zeroshot_retrieval",
    "linear_probe": "linear_probe",
}


def clip_benchmark_records(metrics: dict[str, float], dataset: str, model: str, pretrained: str) -> list[dict]:
    """One CLIP_benchmark result record per evaluator: ``{dataset, model, pretrained, task, metrics, language}``
    with the evaluator's metrics under their bare names (``acc1``, ``image_retrieval_recall@5``, ``lp_acc1``)."""
    by_evaluator: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        evaluator, _, name = key.partition("/")
        if name:
            by_evaluator.setdefault(evaluator, {})[name] = value
    return [
        {
            "dataset": dataset,
            "model": model,
            "pretrained": pretrained,
            "task": CLIP_BENCHMARK_TASKS.get(evaluator, evaluator),
            "metrics": values,
            "language": "en",
        }
        for evaluator, values in by_evaluator.items()
    ]


def clip_benchmark_filename(record: dict) -> str:
    """CLIP_benchmark's default output name ``{dataset}_{pretrained}_{model}_{language}_{task}.json``."""
    parts = [record[k] for k in ("dataset", "pretrained", "model", "language", "task")]
    return "_".join(str(p).strip("/").replace("/", "-") for p in parts) + ".json"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mm-ptft eval", description=__doc__.split("\n")[0])
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

    dataset = resolve_shards(cfg.eval.data, cfg.eval.split).meta.get("name") or Path(cfg.eval.data).name
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
