"""The weight EMA (``train.ema_decay``) against a naive average: on its own, and inside a real Trainer run where it
must average the engine's weights once per optimizer step, be what evaluations score, and be what the run saves.
Exact resume of the EMA on 2 ranks (ZeRO-2, bf16) is covered by tests/test_distributed.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_overrides
from torch import nn

from mm_ptft import checkpoint as ckpt
from mm_ptft.cli import main
from mm_ptft.config import ConfigError, load_config
from mm_ptft.eval import evaluate_model
from mm_ptft.tasks import load_trained
from mm_ptft.train.ema import WeightEMA

ROOT = Path(__file__).resolve().parents[2]
CNN_TINY = ROOT / "configs" / "finetune" / "fmnist-cnn-full-tiny.yaml"


def naive_ema(snapshots: list[dict], decay: float, warmup: bool) -> dict:
    """ema_0 = snapshots[0]; ema_n = d_n · ema_{n-1} + (1 − d_n) · snapshots[n], one key at a time, in float64."""
    ema = {k: v.double() if v.is_floating_point() else v.clone() for k, v in snapshots[0].items()}
    for n, snap in enumerate(snapshots[1:], start=1):
        d = min(decay, (1 + n) / (10 + n)) if warmup else decay
        for k, v in snap.items():
            ema[k] = d * ema[k] + (1 - d) * v.double() if v.is_floating_point() else v.clone()
    return ema


def assert_states_close(got: dict, want: dict, atol: float = 1e-6) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == (torch.float32 if want[k].is_floating_point() else want[k].dtype), k
        torch.testing.assert_close(got[k].double() if got[k].is_floating_point() else got[k], want[k], atol=atol,
                                   rtol=0, msg=k)  # fmt: skip


def snapshot(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def train_recording_ema(trainer, monkeypatch) -> list[dict]:
    """Run ``trainer.train()``; returns the EMA's state before it, then the module's weights at every EMA update
    (recorded from inside the real loop) — the snapshots a naive average of the run starts from."""
    snapshots = [{k: v.clone() for k, v in trainer.ema.state_dict().items()}]
    update = trainer.ema.update

    def recording_update(module):
        snapshots.append(snapshot(module))
        update(module)

    monkeypatch.setattr(trainer.ema, "update", recording_update)
    trainer.train()
    return snapshots


@pytest.mark.parametrize("warmup", [False, True])
def test_weight_ema_matches_a_naive_average_parameters_and_buffers(warmup):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ema = WeightEMA(model, decay=0.3, warmup=warmup)  # 0.3 < the warmup ramp's 0.31 from the 3rd update on
    snapshots = [snapshot(model)]
    for _ in range(6):
        loss = model(torch.randn(16, 6)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(model)
        snapshots.append(snapshot(model))
    assert ema.updates == 6
    want = naive_ema(snapshots, 0.3, warmup)
    assert_states_close(ema.state_dict(), want)
    assert int(ema.state["1.num_batches_tracked"]) == 6  # integer buffers are copied, not averaged
    assert not torch.allclose(ema.state["0.weight"], model[0].weight)  # the average lags the weights

    own = snapshot(model)
    with ema.applied_to(model):
        assert_states_close(snapshot(model), want)
    for k, v in snapshot(model).items():  # the module's own weights come back exactly
        assert torch.equal(v, own[k]), k

    other = WeightEMA(model, decay=0.3)
    other.load_state_dict(ema.state_dict(), ema.updates)
    assert_states_close(other.state_dict(), want)
    with pytest.raises(KeyError, match="does not fit"):
        other.load_state_dict({"0.weight": ema.state["0.weight"]}, 1)


def test_trainer_evaluates_and_saves_the_average_of_its_engine_weights(fmnist_tiny, tmp_path, monkeypatch):
    """A 1-rank fp32 run of the tiny CNN fine-tune (BatchNorm: buffers are averaged too): every update is recorded
    from inside the real loop, and the run's EMA, its evaluation and its saved weights are checked against them."""
    from mm_ptft.train.trainer import Trainer

    steps, decay = 5, 0.3
    overrides = [*tiny_overrides(fmnist_tiny, tmp_path, "ema"), "finetune.init=null", "finetune.head_init=random",
                 "deepspeed.precision=fp32", f"train.steps={steps}", "optim.lr=1e-2", "optim.warmup_steps=0",
                 f"train.ema_decay={decay}", "train.ema_warmup=true", "train.report=false"]  # fmt: skip
    trainer = Trainer(load_config(CNN_TINY, overrides))
    assert trainer.ema is not None
    snapshots = train_recording_ema(trainer, monkeypatch)  # [0]: the fp32 start, before the engine
    assert len(snapshots) == steps + 1  # one update per optimizer step
    want = naive_ema(snapshots, decay, warmup=True)
    assert_states_close(trainer.ema.state_dict(), want)

    run = tmp_path / "ema"
    saved = ckpt.load_weights(run / "model.safetensors")  # the run's weights are the average...
    assert_states_close(saved, {k.removeprefix("model."): v for k, v in want.items()})
    latest = ckpt.resolve_resume(run / "checkpoints", "latest")
    raw = ckpt.consolidate(latest, ema=False)  # ...while the optimizer's own stay in the checkpoint
    torch.testing.assert_close(raw["head.weight"], snapshots[-1]["model.head.weight"])
    assert not torch.allclose(raw["head.weight"], saved["head.weight"])
    assert main(["consolidate", str(run), "--raw", "--out", str(tmp_path / "raw.safetensors")]) == 0
    assert_states_close(ckpt.load_weights(tmp_path / "raw.safetensors"), {k: v.double() for k, v in raw.items()})

    # what the run evaluated at its end is the saved average, scored again from the file
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last_eval = [r for r in records if r["kind"] == "eval"][-1]
    assert last_eval["step"] == steps
    cfg, task = load_trained(run / "model.safetensors")
    again = evaluate_model(cfg, task)
    for name in ("classification/acc1", "classification/loss"):
        assert again[name] == pytest.approx(last_eval[name], abs=1e-5), name


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.ema_decay=1.0"], r"train.ema_decay must be in \(0, 1\)"),
        (["train.ema_decay=0.999", "deepspeed.zero_stage=3"], "train.ema_decay needs deepspeed.zero_stage <= 2"),
    ],
)
def test_bad_ema_settings_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(CNN_TINY, overrides)
    assert "\n" not in str(e.value)


def test_ema_switched_on_at_resume_starts_from_the_resumed_weights(fmnist_tiny, tmp_path, monkeypatch):
    """A checkpoint without ema.safetensors (the run had no EMA): the average starts at the resumed weights, counts
    its updates from there, and lands in the next checkpoint."""
    from mm_ptft.train.trainer import Trainer

    base = [*tiny_overrides(fmnist_tiny, tmp_path, "late"), "finetune.init=null", "finetune.head_init=random",
            "deepspeed.precision=fp32", "train.steps=5", "optim.lr=1e-2", "optim.warmup_steps=0",
            "train.report=false", "eval.every=0"]  # fmt: skip
    Trainer(load_config(CNN_TINY, [*base, "train.steps=3"])).train()
    run = tmp_path / "late"
    first = ckpt.resolve_resume(run / "checkpoints", "latest")
    assert not (first / ckpt.EMA).exists()
    resumed = ckpt.consolidate(first)

    trainer = Trainer(load_config(CNN_TINY, [*base, "train.resume=latest", "train.ema_decay=0.3"]))
    assert trainer.step == 3 and trainer.ema.updates == 0
    start = {k: v.double() if v.is_floating_point() else v for k, v in snapshot(trainer.engine.module).items()}
    assert_states_close(trainer.ema.state_dict(), start)
    for k, v in resumed.items():  # the engine holds the checkpoint's weights
        torch.testing.assert_close(start[f"model.{k}"].double(), v.double(), atol=1e-6, rtol=0, msg=k)
    snapshots = train_recording_ema(trainer, monkeypatch)
    assert len(snapshots) == 3  # steps 4 and 5
    want = naive_ema(snapshots, 0.3, warmup=False)
    assert_states_close(trainer.ema.state_dict(), want)
    last = ckpt.resolve_resume(run / "checkpoints", "latest")
    saved, meta = ckpt.load_weights_with_metadata(last / ckpt.EMA)
    assert meta["updates"] == "2"
    assert_states_close(saved, want)
