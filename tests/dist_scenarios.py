"""Multi-process scenarios run under a real launcher (torchrun or deepspeed), several per launch.

    torchrun --nproc-per-node 2 tests/dist_scenarios.py OUT DATA phase1
    deepspeed --num_gpus 2 tests/dist_scenarios.py OUT DATA phase2

Each scenario is a full Trainer run (its own run directory under OUT); tests/test_distributed.py asserts on what
they leave behind. Grouping them keeps process start-up (imports, DeepSpeed's comm op) to two launches.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from helpers import PRE_TINY as TINY
from helpers import ema_overrides, tiny_overrides

from mm_ptft.config import load_config
from mm_ptft.train.trainer import Trainer


def run(out: Path, data: str, name: str, *overrides: str, local_rank: int | None = None) -> dict:
    cfg = load_config(TINY, [*tiny_overrides(data, out, name), "train.report=false", *overrides])
    result = Trainer(cfg, local_rank=local_rank).train()
    return result


def phase1(out: Path, data: str, bad_data: str, local_rank):
    # ZeRO 1/2/3 (bf16) and 0/3 (fp32, for an exact cross-stage comparison of consolidated weights)
    for stage, precision in [(1, "bf16"), (2, "bf16"), (3, "bf16"), (0, "fp32"), (3, "fp32")]:
        run(
            out,
            data,
            f"zero{stage}-{precision}",
            f"deepspeed.zero_stage={stage}",
            f"deepspeed.precision={precision}",
            "train.steps=6",
            "train.log_every=1",
            "eval.every=3",
            "optim.lr=3e-3",
            "optim.warmup_steps=0",
            "model.text.config.hidden_dropout_prob=0.0",
            "model.text.config.attention_probs_dropout_prob=0.0",
            local_rank=local_rank,
        )
    # exact resume: an uninterrupted reference and an interrupted twin (stopped after step 5, last save at 4);
    # ZeRO-2 also keeps a weight EMA, which must resume exactly too
    for stage in (2, 3):
        common = [
            f"deepspeed.zero_stage={stage}",
            "train.steps=8",
            "train.save_every=4",
            "train.record_keys=true",
            "data.workers=2",
            *ema_overrides(stage),
        ]
        run(out, data, f"ref-zero{stage}", *common, local_rank=local_rank)
        run(out, data, f"cut-zero{stage}", *common, "train.stop_after=5", local_rank=local_rank)
    # a corrupt image inside a shard: skipped, counted, the run completes
    run(out, bad_data, "corrupt", "train.steps=null", "train.epochs=1", "train.log_every=1", local_rank=local_rank)


def phase2(out: Path, data: str, local_rank):
    for stage in (2, 3):
        run(
            out,
            data,
            f"cut-zero{stage}",
            f"deepspeed.zero_stage={stage}",
            "train.steps=8",
            "train.save_every=4",
            "train.record_keys=true",
            "data.workers=2",
            *ema_overrides(stage),
            "train.resume=latest",
            local_rank=local_rank,
        )


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("data")
    p.add_argument("phase", choices=["phase1", "phase2"])
    p.add_argument("--bad-data")
    p.add_argument("--local_rank", type=int, default=None)
    args = p.parse_args()
    out = Path(args.out)
    if args.phase == "phase1":
        phase1(out, args.data, args.bad_data, args.local_rank)
    else:
        phase2(out, args.data, args.local_rank)
    (out / f"{args.phase}.done").write_text(json.dumps({"ok": True}))


if __name__ == "__main__":
    main()
