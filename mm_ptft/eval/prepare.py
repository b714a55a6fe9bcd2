"""The one preparation of an evaluation, used by the Trainer, ``mm-ptft eval``, ``mm-ptft wise-ft`` and
``mm-ptft diff``: the held-out shards (and a train split where an evaluator fits on one), class names and templates,
evaluator settings, and the context the evaluators share.

    plan = plan_eval(cfg)                       # no model, no process group: every config and data check
    ctx = plan.context(task, rank=r, world_size=w, device=d, tokenize=tok)
    metrics = run_evaluators(cfg.eval.evaluators, ctx)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mm_ptft.config import Config, ConfigError
from mm_ptft.data import EvalStream, ShardSet, make_loader, resolve_shards
from mm_ptft.data.classes import resolve_classes
from mm_ptft.data.stats import image_norm_stats
from mm_ptft.eval.base import EvalContext, evaluator_settings, get_evaluator, run_evaluators


@dataclass
class EvalPlan:
    """What an evaluation reads, resolved and checked before any model is built."""

    cfg: Config
    shards: ShardSet  # the held-out split of eval.data
    classnames: list[str] | None
    templates: list[str] | None
    settings: dict[str, Any] = field(default_factory=dict)  # evaluator name → typed settings (eval.settings)
    train_shards: ShardSet | None = None  # the split an evaluator fits on (linear probe), when one is named
    train_max_samples: int | None = None

    def context(
        self,
        task: Any,
        *,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | None = None,
        tokenize: Callable[[list[str]], dict] | None = None,
        out_dir=None,
        samples: Any = None,
    ) -> EvalContext:
        """The evaluators' context for ``task`` on this rank.

        Args:
            task: what is evaluated (a Task; None when only batches are wanted, as ``mm-ptft diff`` does).
            rank, world_size: this process's share of the held-out samples (sample i goes to i % ranks).
            device: where batches go.
            tokenize: captions → token tensors (a picklable :class:`mm_ptft.models.Tokenize`), or None.
            out_dir: where evaluators may draw figures (the run directory).
            samples: the object whose ``decoder`` / ``collator`` / ``dummy_batch`` make batches (default: ``task``).
        """
        cfg = self.cfg
        samples = samples if samples is not None else task
        mean, std = image_norm_stats(cfg)
        workers = min(cfg.data.workers, 1)  # one worker decodes ahead; more would compete with the ranks

        def stream(shards: ShardSet, max_samples: int | None):
            dataset = EvalStream(
                shards,
                samples.decoder(cfg, False, mean, std),
                samples.collator(tokenize),
                cfg.eval.batch_size,
                rank,
                world_size,
                max(workers, 1),
                max_samples,
                cfg.data.remote,
            )
            return make_loader(dataset, workers, cfg.data.prefetch)

        train_batches = None
        if self.train_shards is not None:
            train_batches = lambda: stream(self.train_shards, self.train_max_samples)  # noqa: E731
        return EvalContext(
            task=task,
            tokenize=tokenize,
            batches=lambda: stream(self.shards, cfg.eval.max_samples),
            dummy_batch=lambda: samples.dummy_batch(cfg, tokenize),
            device=device or torch.device("cpu"),
            classnames=self.classnames,
            templates=self.templates,
            train_batches=train_batches,
            settings=dict(self.settings),
            out_dir=out_dir,
        )


def plan_eval(cfg: Config) -> EvalPlan:
    """Resolve and check ``cfg.eval``: shards, evaluators and their settings, class names and templates.

    Raises:
        ConfigError, DataError: one line — no ``eval.data``, missing shards, an unknown evaluator or setting, a
            duplicated class name, a template without ``{}``.
    """
    if not cfg.eval.data:
        raise ConfigError("config: eval.data is required (held-out shards or a data_tools dataset dir)")
    settings = evaluator_settings(cfg.eval.settings)
    shards = resolve_shards(cfg.eval.data, cfg.eval.split, cfg.data.remote)
    classnames, templates = resolve_classes(
        [(cfg.eval.classnames, "eval.classnames")], cfg.eval.templates, [(shards.meta, f"{cfg.eval.data}/dataset.json")]
    )
    plan = EvalPlan(cfg, shards, classnames, templates, settings)
    for name in cfg.eval.evaluators:
        evaluator = get_evaluator(name)
        if evaluator.train_split and plan.train_shards is None:
            options = settings.get(name) or evaluator.settings()
            plan.settings.setdefault(name, options)
            plan.train_shards = resolve_shards(cfg.eval.data, getattr(options, "train_split", "train"), cfg.data.remote)
            plan.train_max_samples = getattr(options, "max_train_samples", None)
    return plan


def plan_evals(cfg: Config) -> list[tuple[str, EvalPlan]]:
    """(metric prefix, plan) of ``eval.data`` (prefix '') and of every ``eval.also`` dataset ('<name>/'), all
    resolved and checked up front.

    Raises:
        ConfigError: two datasets with the same name; whatever :func:`plan_eval` raises for one of them.
    """
    plans = [("", plan_eval(cfg))]
    names = set()
    for i, more in enumerate(cfg.eval.also):
        sub = dataclasses.replace(
            cfg,
            eval=dataclasses.replace(
                cfg.eval,
                data=more.data,
                split=more.split,
                classnames=more.classnames,
                templates=more.templates,
                also=[],
            ),
        )
        plan = plan_eval(sub)
        name = more.name or plan.shards.meta.get("name") or Path(more.data.rstrip("/")).name
        if name in names:
            raise ConfigError(f"config: eval.also[{i}]: a second dataset named '{name}'; give it a distinct `name:`")
        names.add(name)
        plans.append((f"{name}/", plan))
    return plans


def evaluate_model(cfg: Config, task: torch.nn.Module, device: torch.device | None = None) -> dict[str, float]:
    """Run ``cfg.eval.evaluators`` on ``cfg.eval.data`` in this process (the evaluators training runs)."""
    from mm_ptft.models import Tokenize

    plan = plan_eval(cfg)
    tokenize = Tokenize.create(cfg.model.text) if (cfg.model.text.pretrained or cfg.model.text.tokenizer) else None
    device = device or torch.device("cpu")
    ctx = plan.context(task.to(device).eval(), device=device, tokenize=tokenize)
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
