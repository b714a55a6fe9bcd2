"""Cached accumulation against the one-batch gradient, through real DeepSpeed engines (any ZeRO stage, any ranks).

    torchrun --nproc-per-node 2 tests/accum_scenarios.py OUT.json

For each case, two engines start from the same weights with plain SGD (lr 1, no momentum, no decay, no clipping),
so one step moves every parameter by exactly minus its gradient:

- *cached*: k micro-batches of m pairs per rank through ``CachedAccumulation`` (engine with k accumulation steps);
- *reference*: the same k micro-batches forwarded with gradient in one graph, from the same random state (so the
  same dropout / drop-path / patch-dropout masks), their features concatenated into one batch of k·m pairs per rank
  and scored by the task's own loss (open_clip's, gathered across ranks), one backward (engine with 1 step).

The largest difference of any parameter's update and of the loss, and how often the image trunk ran, are written
per case; tests/train/
test_accumulate.py asserts on it. Dropout, drop-path and patch dropout are active in every case.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mm_ptft.config import load_config
from mm_ptft.distributed import init_distributed
from mm_ptft.distributed.engine import build_ds_config, create_engine
from mm_ptft.tasks import create_task
from mm_ptft.train.accumulate import CachedAccumulation

K, M = 4, 3  # micro-batches per step, pairs per micro-batch and rank
TEXT = (
    "model.text.config={model_type: bert, vocab_size: 30522, hidden_size: 32, num_hidden_layers: 2, "
    "num_attention_heads: 2, intermediate_size: 64, max_position_embeddings: 64, hidden_dropout_prob: 0.2, "
    "attention_probs_dropout_prob: 0.2}"
)
CASES = {
    "clip": [],
    "clip-local": ["loss.local_loss=true"],
    "siglip": ["loss.name=siglip", "model.logit_bias_init=-10"],
    "clip-locked-image": ["model.image.lock=true"],
}


def case_config(stage: int, extra: list[str]):
    return load_config(
        None,
        [
            "model.image.name=vit_tiny_patch16_224",
            "model.image.image_size=28",
            "model.image.kwargs={patch_size: 7, embed_dim: 32, depth: 2, num_heads: 2, drop_path_rate: 0.2, "
            "proj_drop_rate: 0.2, patch_drop_rate: 0.25}",
            TEXT,
            "model.text.tokenizer=minilm-l6",
            "model.text.context_length=8",
            "model.embed_dim=16",
            f"data.batch_size={M}",
            f"deepspeed.zero_stage={stage}",
            "deepspeed.precision=fp32",
            "optim.grad_clip=null",
            *extra,
        ],
    )


def micro_batches(rank: int) -> list[dict]:
    g = torch.Generator().manual_seed(100 + rank)  # every rank its own pairs
    out = []
    for _ in range(K):
        mask = torch.ones(M, 8, dtype=torch.long)
        mask[:, 6:] = torch.randint(0, 2, (M, 2), generator=g)
        out.append(
            {
                "image": torch.randn(M, 3, 28, 28, generator=g),
                "input_ids": torch.randint(1000, 2000, (M, 8), generator=g),
                "attention_mask": mask,
            }
        )
    return out


def engine_for(cfg, rank: int, world: int, steps: int):
    cfg.deepspeed.grad_accum_steps = steps
    torch.manual_seed(0)  # the same initial weights for both engines, on every rank
    task = create_task(cfg, rank, world)
    params = [p for p in task.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1.0, momentum=0.0, weight_decay=0.0)
    engine = create_engine(task, optimizer, None, build_ds_config(cfg, world))
    return task, engine


def full_params(engine) -> dict[str, torch.Tensor]:
    """Every trainable parameter, whole (ZeRO-3 partitions them: gathered collectively)."""
    from deepspeed.utils import safe_get_full_fp32_param

    stage = engine.zero_optimization_stage()
    out = {}
    for name, p in engine.module.named_parameters():
        if p.requires_grad:
            out[name] = (safe_get_full_fp32_param(p) if stage > 0 else p.detach()).clone().float()
    return out


def cached_step(cfg, rank, world, batches, seed):
    task, engine = engine_for(cfg, rank, world, K)
    before = full_params(engine)
    acc = CachedAccumulation(engine, task, K, lambda b: b, "cpu", rank)
    calls = []
    hook = task.model.image.trunk.register_forward_hook(lambda *_: calls.append(1))
    torch.manual_seed(seed)
    stream = iter(batches)
    metrics = acc.step(lambda: next(stream))
    hook.remove()
    after = full_params(engine)
    return metrics["loss"], {n: before[n] - after[n] for n in before}, len(calls)


def reference_step(cfg, rank, world, batches, seed):
    task, engine = engine_for(cfg, rank, world, 1)
    before = full_params(engine)
    torch.manual_seed(seed)
    outs = [engine(b, towers=("image", "text")) for b in batches]  # image then text per micro-batch, as cached
    joined = {k: torch.cat([o[k] for o in outs]) for k in ("image_features", "text_features")}
    joined.update({k: v for k, v in outs[-1].items() if k in ("logit_scale", "logit_bias")})
    loss = task.loss(joined)["loss"]
    engine.backward(loss)
    engine.step()
    after = full_params(engine)
    return float(loss.detach()), {n: before[n] - after[n] for n in before}


def compare(stage: int, name: str, rank: int, world: int) -> dict:
    cfg = case_config(stage, CASES[name])
    batches = micro_batches(rank)
    seed = 1234 + rank
    loss_c, grad_c, trunk_forwards = cached_step(cfg, rank, world, batches, seed)
    loss_r, grad_r = reference_step(case_config(stage, CASES[name]), rank, world, batches, seed)
    diff = max(float((grad_c[n] - grad_r[n]).abs().max()) for n in grad_r)
    scale = max(float(g.abs().max()) for g in grad_r.values())
    return {
        "loss_cached": loss_c,
        "loss_reference": loss_r,
        "max_grad_diff": diff,
        "max_grad": scale,
        "params": sorted(grad_r),
        "image_trunk_forwards": trunk_forwards,  # per step of K micro-batches
    }


def run_all(stages: list[int], rank: int, world: int) -> dict:
    return {f"zero{stage}/{name}": compare(stage, name, rank, world) for stage in stages for name in CASES}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--stages", default="2,3")
    p.add_argument("--local_rank", type=int, default=None)
    args = p.parse_args()
    info = init_distributed("gloo", args.local_rank)
    torch.set_num_threads(1)
    results = run_all([int(s) for s in args.stages.split(",")], info.rank, info.world_size)
    if info.rank == 0:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
