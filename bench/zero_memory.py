"""Per-rank memory of parameters + gradients + optimizer state under ZeRO 0/1/2/3, measured vs expected.

    OMP_NUM_THREADS=1 python bench/zero_memory.py [--precision bf16] [--nproc 2] [--out bench/results/x.json]

Model: ViT-S/16 (224 px) + a 6-layer, 384-wide BERT text tower, embedding 256 — large enough for partitioning to
dominate fixed overheads. Each stage runs under the deepspeed launcher with mm-ptft's own engine set-up (task,
parameter groups, generated DeepSpeed config); after one optimizer step every rank counts the bytes of all live
tensor storages (deduplicated) — i.e. parameters, gradients, fp32 master weights and Adam moments, whatever ZeRO
keeps — plus the process's peak RSS. The expected ratio to ZeRO-0 follows the ZeRO paper's accounting for Adam with
Ψ parameters on N ranks (bf16: 2Ψ params + 2Ψ grads + 12Ψ fp32 master/m/v; fp32: 4Ψ + 4Ψ + 8Ψ).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
OVERRIDES = [
    "model.image.name=vit_small_patch16_224",
    "model.image.image_size=224",
    "model.image.kwargs={}",
    "model.embed_dim=256",
    "model.text.tokenizer=minilm-l6",
    "model.text.config={model_type: bert, vocab_size: 30522, hidden_size: 384, num_hidden_layers: 6, "
    "num_attention_heads: 6, intermediate_size: 1536, max_position_embeddings: 64}",
    "model.text.context_length=32",
    "data.batch_size=2",
]


def expected_ratio(stage: int, precision: str, n: int) -> float:
    """Bytes per parameter under ``stage`` relative to ZeRO-0 (params, grads, optimizer state; ZeRO paper)."""
    # bf16: bf16 params and grads + fp32 master, m, v; fp32: the params are the master weights, Adam adds m and v
    p, g, o = (2.0, 2.0, 12.0) if precision == "bf16" else (4.0, 4.0, 8.0)
    per = {0: p + g + o, 1: p + g + o / n, 2: p + g / n + o / n, 3: (p + g + o) / n}
    return per[stage] / per[0]


def live_tensor_bytes() -> int:
    import torch

    gc.collect()
    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or obj.device.type == "meta":
                continue
            storage = obj.untyped_storage()
        except Exception:  # noqa: BLE001 - some objects raise on isinstance/attribute access during gc walks
            continue
        if storage.data_ptr() in seen or storage.nbytes() == 0:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def worker(stage: int, precision: str, out: Path) -> None:
    import torch

    from mm_ptft.config import load_config
    from mm_ptft.distributed import init_distributed
    from mm_ptft.distributed.engine import build_ds_config, create_engine
    from mm_ptft.tasks import create_task
    from mm_ptft.train.optim import create_optimizer, create_scheduler

    cfg = load_config(
        ROOT / "configs" / "pretrain-fmnist.yaml",
        [*OVERRIDES, f"deepspeed.zero_stage={stage}", f"deepspeed.precision={precision}"],
    )
    info = init_distributed()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    task = create_task(cfg, info.rank, info.world_size)
    n_params = sum(p.numel() for p in task.parameters())
    optimizer = create_optimizer(task.model, cfg.optim, prefix="model.")
    scheduler = create_scheduler(optimizer, cfg.optim, 10)
    engine = create_engine(task, optimizer, scheduler, build_ds_config(cfg, info.world_size))
    del task, optimizer  # the engine holds what it needs
    batch = {
        "image": torch.randn(2, 3, 224, 224),
        "input_ids": torch.randint(0, 30522, (2, 32)),
        "attention_mask": torch.ones(2, 32, dtype=torch.long),
    }
    loss = engine(batch)["loss"]
    engine.backward(loss)
    engine.step()
    del loss
    result = {
        "stage": stage,
        "rank": info.rank,
        "params": n_params,
        "tensor_bytes": live_tensor_bytes(),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    (out / f"stage{stage}_rank{info.rank}.json").write_text(json.dumps(result))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--out", default=None)
    p.add_argument("--worker-stage", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker_stage is not None:
        worker(args.worker_stage, args.precision, Path(args.work))
        return 0
    work = Path(tempfile.mkdtemp(prefix="mm_ptft_zero_mem_"))
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    rows = []
    for stage in (0, 1, 2, 3):
        cmd = [
            BIN / "deepspeed",
            "--num_gpus",
            str(args.nproc),
            "--master_port",
            str(_port()),
            __file__,
            "--worker-stage",
            str(stage),
            "--precision",
            args.precision,
            "--work",
            str(work),
        ]
        code = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if code.returncode != 0:
            print(code.stdout[-2000:], code.stderr[-2000:])
            return 1
        ranks = [json.loads((work / f"stage{stage}_rank{r}.json").read_text()) for r in range(args.nproc)]
        rows.append(
            {
                "stage": stage,
                "params": ranks[0]["params"],
                "tensor_mb": max(r["tensor_bytes"] for r in ranks) / 2**20,
                "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks),
            }
        )
    base = rows[0]["tensor_mb"]
    print(
        f"\nZeRO memory per rank, {args.nproc} ranks, {args.precision}, {rows[0]['params'] / 1e6:.1f}M parameters "
        f"(ViT-S/16 + 6-layer BERT)"
    )
    print(f"{'stage':<7}{'params+grads+optim MB':>23}{'ratio':>8}{'expected':>10}{'peak RSS MB':>13}")
    for r in rows:
        r["ratio"] = r["tensor_mb"] / base
        r["expected_ratio"] = expected_ratio(r["stage"], args.precision, args.nproc)
        print(
            f"ZeRO-{r['stage']:<2}{r['tensor_mb']:>23.1f}{r['ratio']:>8.3f}{r['expected_ratio']:>10.3f}"
            f"{r['peak_rss_mb']:>13.0f}"
        )
    stamp = time.strftime("%Y%m%d-%H%M")
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"zero_memory-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"precision": args.precision, "ranks": args.nproc, "rows": rows}, indent=1))
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
