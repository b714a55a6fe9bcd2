"""Peak memory per rank and time per sample against the global contrastive batch: one big batch vs cached
accumulation at a fixed micro-batch (mm_ptft/train/accumulate.py), with plain accumulation at the same k beside it.

    OMP_NUM_THREADS=1 python bench/accum_memory.py [--micro 128] [--max-global 16384] [--cap-gb 6] [--out F.json]

Model: the README recipe (configs/pretrain-fmnist.yaml: ViT 6 × 192 at 28 px + ModernBERT 4 × 192, context 32,
embedding 128), fp32, ZeRO-2, AdamW, 2 ranks × 1 thread under torchrun, synthetic inputs of the recipe's shapes,
each micro-batch made when the step asks for it (as a loader yields them). One launch per (mode, global batch), as
a training run has one batch shape: a warm-up step at that shape, then the measured one — before it the process's
peak resident set is reset (``/proc/self/clear_refs``) and freed heap returned (``malloc_trim``), so the peak read
after it is a steady-state step's. Modes: ``single`` (one batch of global/ranks per rank), ``cached`` (k micro-batches
of ``--micro``, one loss over all), ``plain`` (the same k micro-batches, k independent losses: what DeepSpeed's own
accumulation holds, the reference for what cached accumulation adds). The single series stops before a size whose
predicted peak (twice the last one's growth) would pass the cap; the others run to ``--max-global``.
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


def worker(mode: str, micro: int, global_batch: int, out: Path) -> None:
    import torch

    from mm_ptft.config import load_config
    from mm_ptft.distributed import all_reduce_max, init_distributed
    from mm_ptft.distributed.engine import build_ds_config, create_engine
    from mm_ptft.tasks import create_task
    from mm_ptft.train.accumulate import CachedAccumulation, PlainAccumulation
    from mm_ptft.train.optim import create_optimizer, create_scheduler

    info = init_distributed("gloo")
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(info.rank)
    per_rank = global_batch // RANKS
    k = 1 if mode == "single" else max(1, per_rank // micro)
    size = per_rank if mode == "single" else micro

    def batch() -> dict:
        return {
            "image": torch.randn(size, 3, 28, 28, generator=g),
            "input_ids": torch.randint(1000, 30000, (size, 32), generator=g),
            "attention_mask": torch.ones(size, 32, dtype=torch.long),
        }

    cfg = load_config(
        RECIPE,
        [f"data.batch_size={size}", f"deepspeed.grad_accum_steps={k}", "deepspeed.precision=fp32",
         "deepspeed.zero_stage=2"],
    )  # fmt: skip
    torch.manual_seed(0)
    task = create_task(cfg, info.rank, info.world_size)
    optimizer = create_optimizer(task.model, cfg.optim, prefix="model.")
    scheduler = create_scheduler(optimizer, cfg.optim, 100)
    engine = create_engine(task, optimizer, scheduler, build_ds_config(cfg, info.world_size))
    if mode == "cached":
        accumulation = CachedAccumulation(engine, task, k, lambda b: b, "cpu", info.rank)
    else:  # single is plain accumulation of one micro-batch
        accumulation = PlainAccumulation(engine, k, lambda b: b)
    accumulation.step(batch)  # warm-up at this shape: kernels, allocator, DeepSpeed's buffers
    _reset_peak()
    before = _status_mb("VmRSS")
    t0 = time.perf_counter()
    accumulation.step(batch)
    seconds = all_reduce_max(time.perf_counter() - t0)
    row = {
        "mode": mode,
        "global_batch": global_batch,
        "micro": size,
        "k": k,
        "peak_rss_mb": all_reduce_max(_status_mb("VmHWM")),
        "rss_before_mb": all_reduce_max(before),
        "step_s": seconds,
        "s_per_sample": seconds / global_batch,
    }
    if info.rank == 0:
        ms = row["s_per_sample"] * 1e3
        peak = row["peak_rss_mb"]
        print(f"{mode} {global_batch} (k = {k}): peak {peak:.0f} MB, {seconds:.1f} s ({ms:.2f} ms/sample)", flush=True)
        out.write_text(json.dumps(row))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _largest(rows: list[dict], cap_mb: float) -> int | None:
    fitting = [r["global_batch"] for r in rows if r["peak_rss_mb"] <= cap_mb]
    return max(fitting) if fitting else None


def table(rows: list[dict], cap_mb: float, micro: int) -> str:
    by = {mode: {r["global_batch"]: r for r in rows if r["mode"] == mode} for mode in ("single", "cached", "plain")}
    single, cached, plain = by["single"], by["cached"], by["plain"]
    one = single.get(micro * RANKS) or (cached[min(cached)] if cached else None)  # one micro-batch's step
    lines = [
        f"| global batch | one batch: peak MB/rank | ms/sample | k × {micro} × {RANKS} | plain: peak MB/rank "
        "| cached: peak MB/rank | vs one micro-batch | vs plain | ms/sample | time vs one batch |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in sorted(set(single) | set(cached) | set(plain)):
        s, c, q = single.get(n), cached.get(n), plain.get(n)
        cells = [f"{n:,}"]
        cells += [f"{s['peak_rss_mb']:,.0f}", f"{s['s_per_sample'] * 1e3:.2f}"] if s else ["—", "—"]
        cells.append(str((c or q)["k"]) if (c or q) else "—")
        cells.append(f"{q['peak_rss_mb']:,.0f}" if q else "—")
        if c:
            cells += [f"{c['peak_rss_mb']:,.0f}", f"{c['peak_rss_mb'] / one['peak_rss_mb'] - 1:+.1%}",
                      f"{c['peak_rss_mb'] / q['peak_rss_mb'] - 1:+.1%}" if q else "—",
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
    p.add_argument("--modes", nargs="+", choices=["single", "cached", "plain"], default=["single", "cached", "plain"])
    p.add_argument("--worker", choices=["single", "cached", "plain"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--global-batch", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cap_mb = args.cap_gb * 1024
    if args.worker is not None:
        worker(args.worker, args.micro, args.global_batch, Path(args.work) / f"{args.worker}-{args.global_batch}.json")
        return 0
    work = Path(tempfile.mkdtemp(prefix="mm_ptft_accum_mem_"))
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    rows = []
    for mode in args.modes:
        largest = args.max_single if mode == "single" else args.max_global
        n, base = args.min_global, None
        while n <= largest:
            cmd = [BIN / "torchrun", "--nproc-per-node", str(RANKS), "--master-port", str(_port()), __file__,
                   "--worker", mode, "--global-batch", str(n), "--micro", str(args.micro),
                   "--work", str(work)]  # fmt: skip
            proc = subprocess.run(cmd, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            print("\n".join(line for line in proc.stdout.splitlines() if line.startswith(mode)), flush=True)
            if proc.returncode != 0:
                print(proc.stdout[-3000:])
                return 1
            row = json.loads((work / f"{mode}-{n}.json").read_text())
            rows.append(row)
            base = row["rss_before_mb"] if base is None else base
            if mode == "single" and base + 2 * (row["peak_rss_mb"] - base) > cap_mb:
                break  # the next doubling would pass the cap: stop before the machine swaps
            n *= 2
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
