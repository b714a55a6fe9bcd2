"""Extending mm-ptft from the outside: a new task and a new evaluator, registered in this file alone (no edit
anywhere else), trained with ``mm-ptft train`` and scored again with ``mm-ptft eval``."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import PRE_TINY, records, summary_of, tiny_overrides
from torch import nn

from mm_ptft.cli import main
from mm_ptft.config import Config
from mm_ptft.eval import Classifier, EvalContext, register_evaluator
from mm_ptft.tasks import TASKS, Task


@TASKS.register("toy-linear")
class ToyLinearTask(Task):
    """Logistic regression on raw pixels: a task in a dozen lines."""

    needs_caption = False
    num_classes = 10

    @classmethod
    def from_config(cls, cfg: Config, rank: int = 0, world_size: int = 1) -> ToyLinearTask:
        image = cfg.model.image
        return cls(nn.Sequential(nn.Flatten(), nn.Linear(image.in_chans * image.image_size**2, cls.num_classes)))

    def logits(self, batch: dict) -> torch.Tensor:
        return self.model(batch["image"].to(self.model[1].weight.dtype)).float()

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        return {"loss": F.cross_entropy(self.logits(batch), batch["label"])}


@dataclass
class ConfidenceSettings:
    temperature: float = 1.0  # softmax temperature of the reported confidence


@register_evaluator("toy_confidence", needs=(Classifier,), settings=ConfidenceSettings)
@torch.no_grad()
def evaluate_confidence(ctx: EvalContext) -> dict[str, float]:
    """Mean largest class probability of the held-out images (one rank is enough for this test)."""
    temperature = ctx.setting("toy_confidence").temperature
    top = [(ctx.task.logits(batch) / temperature).softmax(-1).max(-1).values for batch, real in ctx.iterate() if real]
    top = torch.cat(top)
    return {"confidence": top.mean().item(), "n": float(top.numel())}


def test_a_task_and_an_evaluator_from_a_test_file_train_and_evaluate(fmnist_tiny, tmp_path, capsys):
    overrides = [*tiny_overrides(fmnist_tiny, tmp_path, "toy"), "task=toy-linear", "deepspeed.precision=fp32"]
    overrides += ["eval.evaluators=[classification,toy_confidence]", "eval.settings.toy_confidence.temperature=2"]
    assert main(["train", "-c", str(PRE_TINY), *overrides, "optim.lr=1e-3", "train.steps=8"]) == 0
    run = tmp_path / "toy"
    summary = summary_of(run)
    assert summary["toy_confidence/n"] == 256 and 0.1 <= summary["toy_confidence/confidence"] <= 1.0
    assert summary["classification/acc1"] > 0.3  # a built-in evaluator scores the new task through its Protocol
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["task"] == "toy-linear" and "loss" not in saved  # the task reads no contrastive section
    losses = [r["loss"] for r in records(run, "train")]
    assert losses[-1] < losses[0]
    capsys.readouterr()
    # the saved run is evaluated by `mm-ptft eval` with the same numbers (fp32 weights, fp32 evaluation)
    assert main(["eval", "--model", str(run), "--out", str(tmp_path / "eval.json")]) == 0
    again = json.loads((tmp_path / "eval.json").read_text())["metrics"]
    for key in ("classification/acc1", "classification/loss", "toy_confidence/confidence"):
        assert again[key] == pytest.approx(summary[key], abs=1e-5), key


def test_an_evaluator_the_task_cannot_serve_is_a_one_line_error(fmnist_tiny, tmp_path, capsys):
    overrides = [*tiny_overrides(fmnist_tiny, tmp_path, "toy"), "task=toy-linear", "deepspeed.precision=fp32"]
    assert main(["train", "-c", str(PRE_TINY), *overrides, "eval.evaluators=[zeroshot]", "train.steps=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: eval: evaluator 'zeroshot' needs a task that is a ImageTextEncoder (encode_image")
    assert err.endswith("ToyLinearTask is not") and "\n" not in err
    assert main(["train", "-c", str(PRE_TINY), *overrides, "eval.settings.toy_confidence.temprature=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown key 'eval.settings.toy_confidence.temprature' (did you mean 'temperature'?)" in err
