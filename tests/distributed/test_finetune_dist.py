"""Fine-tuning on 2 ranks under torchrun: ZeRO-3 (last-n, zero-shot head, evaluation in lock-step) and ZeRO-2
(linear probe) image classification, ZeRO-3 text classification, and LoRA under ZeRO-2 and ZeRO-3 — one launch for
all five.

What a policy freezes must come out of any ZeRO stage exactly as it went in (rounded to the bf16 the engine holds
it in): the reference is the pretrained checkpoint itself.

    PYTHONPATH=tests torchrun --nproc-per-node 2 tests/distributed/test_finetune_dist.py OUT IMAGE_DATA TEXT_DATA \
        PRETRAINED                                                                             (the launch)
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from helpers import BIN, FT_TINY, TEXT_TINY, free_port, records, run_launcher, summary_of, tiny_overrides, tower_groups

pytestmark = [pytest.mark.dist, pytest.mark.slow]
UNLOCKED = 2  # last-n: trailing layer groups of the tiny ViT that train (a block, and a final norm group if any)


def scenarios(out: Path, image_data: str, text_data: str, pretrained: str) -> None:
    """Runs on every rank (the launched part)."""
    from mm_ptft.config import load_config
    from mm_ptft.train.trainer import Trainer

    def run(config, data, name, *overrides):
        cfg = load_config(config, [*tiny_overrides(data, out, name), "train.report=false", *overrides])
        Trainer(cfg).train()

    run(
        FT_TINY,
        image_data,
        "zero3-lastn",
        f"finetune.init={pretrained}",
        "deepspeed.zero_stage=3",
        "finetune.policy=last-n",
        f"finetune.unlocked_groups={UNLOCKED}",
        "train.steps=4",
        "eval.every=2",
        "optim.lr=1e-2",
    )
    run(
        FT_TINY,
        image_data,
        "zero2-probe",
        f"finetune.init={pretrained}",
        "deepspeed.zero_stage=2",
        "finetune.policy=linear-probe",
        "finetune.head_init=random",
        "train.steps=3",
    )
    run(TEXT_TINY, text_data, "zero3-text", "deepspeed.zero_stage=3", "train.steps=4", "eval.every=2")  # fmt: skip
    for stage in (2, 3):  # the same LoRA fine-tune (fp32) under both stages
        run(FT_TINY, image_data, f"zero{stage}-lora", f"finetune.init={pretrained}", f"deepspeed.zero_stage={stage}",
            "deepspeed.precision=fp32", "finetune.policy=lora", "finetune.lora.rank=4", "train.steps=3",
            "optim.lr=5e-3", "eval.at_start=false")  # fmt: skip


@pytest.fixture(scope="module")
def launched(tmp_path_factory, fmnist_tiny, pretrained):
    import data_tools

    out = tmp_path_factory.mktemp("finetune-dist")
    text = out / "fortunes"
    assert data_tools.main(["fortunes", "--out", str(text), "--max-per-topic", "60", "--shard-size", "30"]) == 0
    cmd = [BIN / "torchrun", "--nproc-per-node", "2", "--master-port", str(free_port()),
           __file__, str(out), str(fmnist_tiny), str(text), str(pretrained)]  # fmt: skip
    run_launcher(cmd, out / "launch.log")
    return out, pretrained


def _bf16(t):
    return t.bfloat16().float()


def test_zero3_last_n_keeps_frozen_groups_and_evaluates_in_lock_step(launched):
    from mm_ptft.checkpoint import load_weights

    out, pretrained = launched
    run = out / "zero3-lastn"
    pre, best = load_weights(pretrained / "model.safetensors"), load_weights(run / "best.safetensors")
    groups = [[f"image.{n}" for n in g] for g in tower_groups(run)[:-1]]  # the trunk's groups, input → output
    frozen = [n for g in groups[:-UNLOCKED] for n in g]
    trained = [n for g in groups[-UNLOCKED:] for n in g]
    assert frozen and all((best[k] == _bf16(pre[k])).all() for k in frozen)
    block = next(n for n in trained if ".blocks." in n and n.endswith("fc1.weight"))  # a transformer block trained
    assert not (best[block] == _bf16(pre[block])).all()
    evals = records(run, "eval")
    # eval.at_start: step 0 too, every rank in lock-step under ZeRO-3 before the first optimizer step
    assert [e["step"] for e in evals] == [0, 2, 4] and all(e["classification/n"] == 256 for e in evals)


def test_zero2_linear_probe_trains_only_the_head(launched):
    import torch

    from mm_ptft.checkpoint import load_weights
    from mm_ptft.config import load_config
    from mm_ptft.tasks import create_task

    out, pretrained = launched
    run = out / "zero2-probe"
    pre, final = load_weights(pretrained / "model.safetensors"), load_weights(run / "model.safetensors")
    tower = [k for k in final if k.startswith("image.")]
    assert tower and all((final[k] == _bf16(pre[k])).all() for k in tower)
    # the run's head at step 0: the Trainer seeds train.seed before building the task, so the same build repeats it
    cfg = load_config(run / "config.yaml")
    torch.manual_seed(cfg.train.seed)
    start = create_task(cfg).model.head.state_dict()
    for name in ("weight", "bias"):
        moved = (final[f"head.{name}"] - _bf16(start[name])).abs().max().item()
        assert moved > 1e-3, f"head.{name} did not train (largest change {moved:.2g})"


def test_zero3_text_classification_runs_and_consolidates(launched):
    from mm_ptft.checkpoint import load_weights

    out, _ = launched
    run = out / "zero3-text"
    state = load_weights(run / "model.safetensors")
    assert state["head.weight"].shape == (4, 32) and any(k.startswith("text.transformer.") for k in state)
    summary = summary_of(run)
    assert summary["classification/n"] == 48  # 20 % of 60 quotes × 4 topics, every rank's share counted once


if __name__ == "__main__":
    scenarios(Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4])


def test_lora_under_zero2_and_zero3_merges_the_same_tower(launched):
    """2 ranks, fp32: both stages consolidate to the same merged tower under plain names; the unmerged checkpoint
    keeps the pretrained weights exactly as they were (the adapters trained); each run wrote its peft adapter."""
    import torch

    from mm_ptft import checkpoint as ckpt

    out, pretrained = launched
    z2, z3 = (ckpt.load_weights(out / f"zero{s}-lora" / "model.safetensors") for s in (2, 3))
    assert z2.keys() == z3.keys() and not any(ckpt.BASE_LAYER in k or ".lora_" in k for k in z3)
    for k in z3:
        torch.testing.assert_close(z2[k], z3[k], atol=1e-5, rtol=0, msg=k)
    pre = ckpt.load_weights(pretrained / "model.safetensors")
    raw = ckpt.consolidate(ckpt.resolve_resume(out / "zero3-lora" / "checkpoints", "latest"), merge=False)
    base = {k: v for k, v in raw.items() if ckpt.BASE_LAYER in k}
    assert base and all(torch.equal(v, pre[k.replace(ckpt.BASE_LAYER, ".")]) for k, v in base.items())
    assert max(v.abs().max().item() for k, v in raw.items() if ".lora_B." in k) > 1e-3
    qkv = "image.trunk.blocks.0.attn.qkv.weight"
    assert not torch.equal(z3[qkv], pre[qkv])  # the merged tower moved where the adapters are
    assert all((out / f"zero{s}-lora" / "adapter" / "adapter_config.json").is_file() for s in (2, 3))
