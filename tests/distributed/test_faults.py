"""Fault injection across processes (docs/reliability.md): a rank SIGKILLed in the middle of a save, then another
at a random step (both by MM_PTFT_FAULT, see mm_ptft/faults.py); each time `train.resume=latest` continues. The keys
every rank consumed, once the replayed steps after the last checkpoint are removed, must equal an uninterrupted run's
exactly (nothing lost, nothing repeated), and so must the final weights. ZeRO-2 (with a weight EMA) and ZeRO-3."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import BIN, ROOT, ema_overrides, free_port, launch_env, recorded_keys, split_attempts

from mm_ptft import checkpoint as ckpt

pytestmark = [pytest.mark.dist, pytest.mark.slow]
TINY = ROOT / "configs" / "pretrain-fmnist-tiny.yaml"


def _launch(out: Path, data: Path, stage: int, resume: bool, env_extra: dict | None = None) -> subprocess.Popen:
    # the same run as tests/dist_scenarios.py's ref-zero{stage} (8 steps, 2 workers, keys recorded), saving more often
    cmd = [
        *(BIN / "deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "--module", "mm_ptft", "train"),
        *("-c", str(TINY), f"data.train={data}", f"eval.data={data}", f"train.output_dir={out}"),
        *(f"train.name=z{stage}", "train.progress=false", "train.tensorboard=false", "train.report=false"),
        *(f"deepspeed.zero_stage={stage}", "train.steps=8", "train.save_every=2", "train.record_keys=true"),
        *("data.workers=2", "deepspeed.timeout_s=60", *ema_overrides(stage)),  # ZeRO-2: the weight EMA survives too
    ]
    if resume:
        cmd.append("train.resume=latest")
    env = dict(launch_env(), **(env_extra or {}))
    log = open(out / f"z{stage}-attempt{len(list(out.glob(f'z{stage}-attempt*.log')))}.log", "w")  # noqa: SIM115
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


@pytest.mark.parametrize("stage", [2, 3])
def test_killed_ranks_lose_nothing(scenarios, tmp_path, fmnist_tiny, stage):
    run = tmp_path / f"z{stage}"
    # attempt 1: rank 1 is SIGKILLed in the middle of saving step 4 (DeepSpeed's files written, ours not)
    p = _launch(tmp_path, fmnist_tiny, stage, False, {"MM_PTFT_FAULT": "mid_save:4:1"})
    assert p.wait(timeout=300) != 0
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert (run / "checkpoints" / ".partial-step_00000004").is_dir()
    assert ckpt.resolve_resume(run / "checkpoints", "latest").name == "step_00000002"

    # attempt 2: resume; rank 1 is SIGKILLed at a random step after the next checkpoint
    kill_at = random.Random(stage).choice([5, 6, 7])
    p = _launch(tmp_path, fmnist_tiny, stage, True, {"MM_PTFT_FAULT": f"step:{kill_at}:1"})
    assert p.wait(timeout=300) != 0, "the launcher must fail when a rank dies"
    assert ckpt.resolve_resume(run / "checkpoints", "latest").name == f"step_{kill_at // 2 * 2:08d}"

    # attempt 3: resume to the end
    p = _launch(tmp_path, fmnist_tiny, stage, True)
    assert p.wait(timeout=300) == 0, (tmp_path / f"z{stage}-attempt2.log").read_text()[-3000:]

    ref = scenarios / f"ref-zero{stage}"
    per_step = 2 if stage == 2 else 1  # ZeRO-2 accumulates two micro-batches per step (helpers.ema_overrides)
    for rank in (0, 1):
        attempts = split_attempts(recorded_keys(run, rank), per_step)
        assert len(attempts) == 3
        consumed = []
        for i, attempt in enumerate(attempts):
            resume_at = attempts[i + 1][0][0] if i + 1 < len(attempts) else None
            kept = [(s, k) for s, k in attempt if resume_at is None or s < resume_at]
            replayed = [(s, k) for s, k in attempt if resume_at is not None and s >= resume_at]
            # steps after the last checkpoint are replayed exactly by the next attempt
            if resume_at is not None:
                assert replayed == attempts[i + 1][: len(replayed)], f"rank {rank} attempt {i}"
            consumed += kept
        assert [k for _, k in consumed] == [k for _, k in recorded_keys(ref, rank)], f"rank {rank}"
        assert [s for s, _ in consumed] == [s for s in range(8) for _ in range(per_step)]
    a = ckpt.load_weights(ref / "model.safetensors")
    b = ckpt.load_weights(run / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)
