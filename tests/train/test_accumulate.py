"""Cached contrastive accumulation (mm_ptft/train/accumulate.py) is one batch of the global size, exactly.

- Through real DeepSpeed engines (tests/accum_scenarios.py): k = 4 micro-batches give the loss and every
  parameter's gradient of one batch of 4·m pairs with the same dropout / drop-path / patch-dropout masks (fp32,
  1e-5), for InfoNCE (full and local loss), SigLIP and a locked image tower; on 1 rank in this process, on 2 ranks
  under ZeRO-2 and ZeRO-3 in one torchrun launch.
- Through the Trainer on real Fashion-MNIST: one plain-SGD step of 4 × 8 cached equals one step of one batch of 32;
  plain accumulation does not (that is what it is documented to do), and says so.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import BIN, PRE_TINY, free_port, recorded_keys, records, run_launcher, tiny_overrides

from mm_ptft import checkpoint as ckpt
from mm_ptft.config import load_config
from mm_ptft.train.trainer import Trainer

TOLERANCE = 1e-5


def _assert_exact(results: dict, expected_cases: int) -> None:
    import accum_scenarios

    assert len(results) == expected_cases
    for case, r in results.items():
        assert r["max_grad"] > 1e-3, f"{case}: the gradient is trivially small"  # the comparison means something
        assert r["max_grad_diff"] <= TOLERANCE, f"{case}: {r}"
        assert abs(r["loss_cached"] - r["loss_reference"]) <= TOLERANCE * max(1.0, abs(r["loss_reference"])), case
        locked = case.endswith("locked-image")
        # LiT: the locked trunk runs once per micro-batch (its projection trains and runs twice); others twice
        assert r["image_trunk_forwards"] == (1 if locked else 2) * accum_scenarios.K, case
        trains = {p for p in r["params"] if p.startswith("model.image.")}
        assert trains == {"model.image.proj.weight"} if locked else len(trains) > 1, case


def test_cached_accumulation_is_exact_on_one_rank():
    import accum_scenarios

    from mm_ptft.distributed import init_distributed

    init_distributed("gloo", None)
    _assert_exact(accum_scenarios.run_all([0], 0, 1), len(accum_scenarios.CASES))


@pytest.mark.dist
@pytest.mark.slow
def test_cached_accumulation_is_exact_on_two_ranks_under_zero2_and_zero3(tmp_path):
    import accum_scenarios

    out = tmp_path / "accum.json"
    script = "tests/accum_scenarios.py"
    cmd = [BIN / "torchrun", "--nproc-per-node", "2", "--master-port", str(free_port()), script, str(out)]
    run_launcher(cmd, tmp_path / "accum.log")
    _assert_exact(json.loads(out.read_text()), 2 * len(accum_scenarios.CASES))


def _one_sgd_step(data, out, name, batch, k, accumulation="cached"):
    cfg = load_config(
        PRE_TINY,
        [
            *tiny_overrides(data, out, name),
            f"data.batch_size={batch}",
            f"deepspeed.grad_accum_steps={k}",
            f"loss.accumulation={accumulation}",
            "deepspeed.precision=fp32",
            "train.steps=1",
            "train.log_every=1",
            "train.record_keys=true",
            "optim.name=sgd",
            "optim.momentum=0.0",
            "optim.nesterov=false",
            "optim.weight_decay=0.0",
            "optim.lr=0.5",
            "optim.warmup_steps=0",
            "optim.grad_clip=null",
            "model.text.config.hidden_dropout_prob=0.0",  # a real batch of 32 draws other masks than 4 × 8
            "model.text.config.attention_probs_dropout_prob=0.0",
            "eval.every=0",
        ],
    )
    Trainer(cfg).train()
    return out / name


def test_trainer_step_of_4_cached_micro_batches_equals_one_batch_of_32(fmnist_tiny, tmp_path, capsys):
    init = load_config(PRE_TINY, tiny_overrides(fmnist_tiny, tmp_path, "init"))
    torch.manual_seed(init.train.seed)
    from mm_ptft.models import create_model

    start = create_model(init.model).state_dict()
    big = _one_sgd_step(fmnist_tiny, tmp_path, "big", 32, 1)
    cached = _one_sgd_step(fmnist_tiny, tmp_path, "cached", 8, 4)
    plain = _one_sgd_step(fmnist_tiny, tmp_path, "plain", 8, 4, "plain")
    said = capsys.readouterr().out
    assert "accumulation: cached over 4 micro-batches" in said and "31 negatives" in said
    assert "loss.accumulation=plain sums 4 micro-batch losses, each with 7 negatives" in said

    keys = [k for _, batch_keys in recorded_keys(big, 0) for k in batch_keys]
    for run in (cached, plain):  # the same 32 samples, in the same order
        assert [k for _, batch_keys in recorded_keys(run, 0) for k in batch_keys] == keys
    w = {run: ckpt.load_weights(run / "model.safetensors") for run in (big, cached, plain)}
    update = max(float((w[big][k] - start[k]).abs().max()) for k in start)
    assert update > 1e-3  # the step moved the weights
    for k in start:
        torch.testing.assert_close(w[cached][k], w[big][k], atol=TOLERANCE, rtol=0, msg=k)
    plain_off = max(float((w[plain][k] - w[big][k]).abs().max()) for k in start)
    assert plain_off > 0.05 * update  # k small-batch losses are another objective

    train = {run: records(run, "train")[-1] for run in (big, cached, plain)}
    assert train[cached]["loss"] == pytest.approx(train[big]["loss"], abs=1e-5)
    assert (train[big]["negatives"], train[cached]["negatives"], train[plain]["negatives"]) == (31, 31, 7)
    assert "| Negatives per sample in the loss | 31 |" in (cached / "report.md").read_text()


def test_a_loss_without_cached_support_is_a_one_line_config_error():
    from helpers import tiny_cfg

    from mm_ptft.config import ConfigError
    from mm_ptft.tasks import create_task
    from mm_ptft.train.accumulate import PlainAccumulation, create_accumulation

    cfg = tiny_cfg("deepspeed.grad_accum_steps=2")
    task = create_task(cfg)
    task.loss = torch.nn.Identity()  # a user's loss with forward() only
    with pytest.raises(ConfigError, match="has no rows, rows_loss, grad_reduction .* set loss.accumulation=plain"):
        create_accumulation(cfg, task, None, lambda b: b, "cpu", 0)
    cfg.loss.accumulation = "plain"
    assert isinstance(create_accumulation(cfg, task, None, lambda b: b, "cpu", 0), PlainAccumulation)


def test_held_inputs_give_back_each_micro_batch_as_the_loader_gave_it():
    """The second pass's inputs: row tensors copied into one buffer per key, everything else kept; a smaller last
    micro-batch, a key whose shape changes, and non-tensor values come back unchanged."""
    from mm_ptft.train.accumulate import _Inputs

    g = torch.Generator().manual_seed(0)
    batches = []
    for j, n in enumerate((4, 4, 3)):
        batches.append(
            {
                "image": torch.randn(n, 3, 5, 5, generator=g),
                "input_ids": torch.randint(0, 100, (n, 7), generator=g),
                "label": torch.arange(n) + 10 * j,
                "ragged": torch.zeros(n, 2 + j),  # its width changes: kept as it is from the second batch on
                "key": [f"s{j}-{i}" for i in range(n)],
                "_state": {"position": j},
                "scalar": torch.tensor(float(j)),
            }
        )
    held = _Inputs(steps=3)
    for b in batches:
        held.append({k: (v.clone() if torch.is_tensor(v) else v) for k, v in b.items()})
    assert len(held) == 3
    assert set(held.rows) == {"image", "input_ids", "label", "ragged"}
    for j, b in enumerate(batches):
        got = held[j]
        assert list(got) == list(b)
        for k, v in b.items():
            if torch.is_tensor(v):
                assert got[k].dtype == v.dtype and torch.equal(got[k], v), (j, k)
            else:
                assert got[k] == v, (j, k)
    assert held.rows["image"].buf.shape[0] == 12  # one buffer for the step, sized at the first micro-batch
