"""Peak memory per rank and time per sample against the global contrastive batch: one big batch vs cached
accumulation at a fixed micro-batch (mm_ptft/train/accumulate.py).

    OMP_NUM_THREADS=1 python bench/accum_memory.py [--micro 128] [--max-global 16384] [--cap-gb 6] [--out F.json]

Model: the README recipe (configs/pretrain-fmnist.yaml: ViT 6 × 192 at 28 px + ModernBERT 4 × 192, context 32,
embedding 128), fp32, ZeRO-2, AdamW, 2 ranks × 1 thread under torchrun, synthetic inputs of the recipe's shapes.
Two launches, one per mode, each one engine running its global batches in ascending order (256, 512, …; the
engine's micro-batch or accumulation steps set per size): before each step
the process's peak resident set is reset (``/proc/self/clear_refs``) and freed heap returned (``malloc_trim``), so
the peak read after the step is that step's. The single-batch series stops before a step whose predicted peak
(twice the last one's growth) would pass the cap; the cached series runs to ``--max-global``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RECIPE = ROOT / "configs" / "pretrain-fmnist.yaml"
RANKS = 2


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def worker(mode: str, micro: int, sizes: list[int], cap_mb: float, out: Path) -> None:
    import torch

    from mm_ptft.config import load_config
    from mm_ptft.distributed import all_reduce_max, init_distributed
    from mm_ptft.distributed.engine import build_ds_config, create_engine
    from mm_ptft.tasks import create_task
    from mm_ptft.train.accumulate import CachedAccumulation
    from mm_ptft.train.optim import create_optimizer, create_scheduler

    info = init_distributed("gloo")
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(info.rank)

    def batch(n: int) -> dict:
        return {
            "image": torch.randn(n, 3, 28, 28, generator=g),
            "input_ids": torch.randint(1000, 30000, (n, 32), generator=g),
            "attention_mask": torch.ones(n, 32, dtype=torch.long),
        }

    def build(per_rank: int, steps: int):
        cfg = load_config(
            RECIPE,
            [
                f"data.batch_size={per_rank}",
                f"deepspeed.grad_accum_steps={steps}",
                "deepspeed.precision=fp32",
                "deepspeed.zero_stage=2",
            ],
        )
        torch.manual_seed(0)
        task = create_task(cfg, info.rank, info.world_size)
        optimizer = create_optimizer(task.model, cfg.optim, prefix="model.")
        scheduler = create_scheduler(optimizer, cfg.optim, 100)
        return task, create_engine(task, optimizer, scheduler, build_ds_config(cfg, info.world_size))

    def single_step(engine, per_rank: int) -> None:
        loss = engine(batch(per_rank))["loss"]
        engine.backward(loss)
        engine.step()

    def cached_step(engine, task, k: int) -> None:
        # one micro-batch made per call, as a loader yields them: what the step holds is the accumulator's doing
        CachedAccumulation(engine, task, k, lambda b: b, "cpu", info.rank).step(lambda: batch(micro))

    rows, base = [], None
    task, engine = build(micro, 1)  # one engine per mode (a rebuilt one would keep the last one's memory)
    single_step(engine, micro)  # warm-up: kernels, allocator, DeepSpeed buffers
    for global_batch in sizes:
        per_rank = global_batch // RANKS
        k = max(1, per_rank // micro)
        if mode == "single":
            engine.set_train_micro_batch_size(per_rank)
        else:
            engine.set_train_batch_size(k * micro * RANKS)  # k accumulation steps
        _reset_peak()
        before = _status_mb("VmRSS")
        t0 = time.perf_counter()
        if mode == "single":
            single_step(engine, per_rank)
        else:
            cached_step(engine, task, k)
        seconds = all_reduce_max(time.perf_counter() - t0)
        peak = all_reduce_max(_status_mb("VmHWM"))
        before = all_reduce_max(before)
        base = before if base is None else base
        rows.append(
            {
                "mode": mode,
                "global_batch": global_batch,
                "micro": per_rank if mode == "single" else micro,
                "k": 1 if mode == "single" else k,
                "peak_rss_mb": peak,
                "rss_before_mb": before,
                "step_s": seconds,
                "s_per_sample": seconds / global_batch,
            }
        )
        if info.rank == 0:
            ms = rows[-1]["s_per_sample"] * 1e3
            print(f"{mode} {global_batch}: peak {peak:.0f} MB, {seconds:.1f} s ({ms:.2f} ms/sample)", flush=True)
        if mode == "single" and base + 2 * (peak - base) > cap_mb:
            break  # the next doubling would pass the cap: stop before the machine swaps
    if info.rank == 0:
        out.write_text(json.dumps(rows))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _largest(rows: list[dict], cap_mb: float) -> int | None:
    fitting = [r["global_batch"] for r in rows if r["peak_rss_mb"] <= cap_mb]
    return max(fitting) if fitting else None


def table(rows: list[dict], cap_mb: float, micro: int) -> str:
    single = {r["global_batch"]: r for r in rows if r["mode"] == "single"}
    cached = {r["global_batch"]: r for r in rows if r["mode"] == "cached"}
    first = cached[min(cached)]["peak_rss_mb"] if cached else None
    lines = [
        f"| global batch | one batch: peak MB/rank | ms/sample | cached k × {micro} × {RANKS}: k | peak MB/rank "
        "| vs k=1 | ms/sample | time vs one batch |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in sorted(set(single) | set(cached)):
        s, c = single.get(n), cached.get(n)
        cells = [f"{n:,}"]
        cells += [f"{s['peak_rss_mb']:,.0f}", f"{s['s_per_sample'] * 1e3:.2f}"] if s else ["—", "—"]
        if c:
            cells += [str(c["k"]), f"{c['peak_rss_mb']:,.0f}", f"{c['peak_rss_mb'] / first - 1:+.1%}",
                      f"{c['s_per_sample'] * 1e3:.2f}"]  # fmt: skip
            cells.append(f"{c['s_per_sample'] / s['s_per_sample']:.2f}×" if s else "—")
        else:
            cells += ["—"] * 5
        lines.append("| " + " | ".join(cells) + " |")
    a, b = _largest(list(single.values()), cap_mb), _largest(list(cached.values()), cap_mb)
    lines.append("")
    lines.append(
        f"Largest global batch under a {cap_mb / 1024:.1f} GiB-per-rank cap: one batch {a or 'none'}, cached "
        f"{b or 'none'} (measured up to {max(cached) if cached else 0:,})" + (f": {b / a:.0f}×" if a and b else "")
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--micro", type=int, default=128, help="cached accumulation's micro-batch per rank")
    p.add_argument("--min-global", type=int, default=256)
    p.add_argument("--max-global", type=int, default=16384)
    p.add_argument("--max-single", type=int, default=16384, help="largest one-batch global size to try")
    p.add_argument("--cap-gb", type=float, default=6.0, help="memory cap per rank (GiB) for the 'largest batch' line")
    p.add_argument("--out", default=None)
    p.add_argument("--worker", choices=["single", "cached"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--sizes", default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cap_mb = args.cap_gb * 1024
    if args.worker is not None:
        sizes = [int(s) for s in args.sizes.split(",")]
        worker(args.worker, args.micro, sizes, cap_mb, Path(args.work) / f"{args.worker}.json")
        return 0
    work = Path(tempfile.mkdtemp(prefix="mm_ptft_accum_mem_"))
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    rows = []
    for mode, largest in (("single", args.max_single), ("cached", args.max_global)):
        sizes, n = [], args.min_global
        while n <= largest:
            sizes.append(n)
            n *= 2
        cmd = [BIN / "torchrun", "--nproc-per-node", str(RANKS), "--master-port", str(_port()), __file__,
               "--worker", mode, "--sizes", ",".join(map(str, sizes)), "--micro", str(args.micro),
               "--cap-gb", str(args.cap_gb), "--work", str(work)]  # fmt: skip
        proc = subprocess.run(cmd, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        print("\n".join(line for line in proc.stdout.splitlines() if line.startswith(mode)), flush=True)
        if proc.returncode != 0:
            print(proc.stdout[-3000:])
            return 1
        rows += json.loads((work / f"{mode}.json").read_text())
    print(f"\nrecipe model (ViT 6×192 at 28 px + ModernBERT 4×192), fp32, ZeRO-2, {RANKS} ranks × 1 thread\n")
    print(table(rows, cap_mb, args.micro))
    stamp = time.strftime("%Y%m%d-%H%M")
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"accum_memory-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"micro": args.micro, "cap_mb": cap_mb, "ranks": RANKS, "rows": rows}, indent=1))
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
