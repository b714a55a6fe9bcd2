"""Scaling tables: samples/s and peak memory per rank against model size and ZeRO stage, and the largest dual
encoder that trains on this machine under ZeRO-0 vs ZeRO-3 + activation checkpointing, found by trying.

    OMP_NUM_THREADS=1 python bench/scaling.py [--sizes T S B] [--text-layers 4 12] [--stages 0 2 3] [--batch 16]
                                              [--steps 6] [--warmup 2] [--largest] [--out bench/results/x.json]

Every row is one ``deepspeed --module mm_ptft train`` launch of bench/pretrain_throughput.py's kind (same shards,
upsampled to 224 px, bf16, 2 ranks × 1 thread here). The towers, as open_clip's family: ViT-T/S/B/L/16, ViT-H/g/14
at 224 px; a ModernBERT text tower of the width open_clip pairs with that ViT (192 … 1024; GeGLU MLP of 2/3 × 4 ×
width, the parameters and FLOPs of a 4 × GELU MLP) with 4 or 12 layers (24 for L, H, g in ``--largest``), context 77.
Per row: samples/s (median after ``--warmup`` steps), model GFLOP/s (FLOPs per sample from torch's flop counter)
and its share of the bf16 matrix-product limit measured in this run at that ViT's MLP GEMM, peak RSS of the larger
rank, the parameter count.

``--largest`` then tries models in ascending size under ZeRO-0 and under ZeRO-3 with activation checkpointing (2
samples per rank, 3 steps), each series until the first that does not train: a launch is stopped (and reported "out
of memory") when the machine's available memory falls below ``--reserve-mb``, instead of waking the OOM killer.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pretrain_throughput as pt  # noqa: E402  (the launcher, FLOP counter, matmul limit and summary of that bench)

ROOT = pt.ROOT


class Tower(NamedTuple):
    """One ViT and the text tower of its width (open_clip's pairing)."""

    width: int
    depth: int
    heads: int
    patch: int
    mlp_ratio: float
    text_width: int
    text_heads: int
    embed_dim: int


# timm's ViT family (vit_*_patch16_224 / vit_huge_patch14_224 / vit_giant_patch14_224 shapes) with the text width and
# embedding open_clip's ViT-*-16 / -14 configs pair with them
TOWERS = {
    "T": Tower(192, 12, 3, 16, 4.0, 192, 3, 512),
    "S": Tower(384, 12, 6, 16, 4.0, 384, 6, 512),
    "B": Tower(768, 12, 12, 16, 4.0, 512, 8, 512),
    "L": Tower(1024, 24, 16, 16, 4.0, 768, 12, 768),
    "H": Tower(1280, 32, 16, 14, 4.0, 1024, 16, 1024),
    "g": Tower(1408, 40, 16, 14, 48 / 11, 1024, 16, 1024),
}
LARGEST = [("B", 12), ("L", 12), ("L", 24), ("H", 24), ("g", 24)]  # ascending in parameters


def geglu_intermediate(width: int) -> int:
    """ModernBERT's GeGLU MLP (3 · width · I weights) with the parameters of a 4 × width GELU MLP, a multiple of 8."""
    return int(round(2 * 4 * width / 3 / 8)) * 8


def overrides(size: str, text_layers: int, batch: int) -> list[str]:
    """Dotted overrides of configs/pretrain-fmnist.yaml for ViT-``size`` at 224 px + a ``text_layers`` text tower."""
    t = TOWERS[size]
    return [
        f"model.embed_dim={t.embed_dim}",
        "model.image.image_size=224",
        f"model.image.kwargs.patch_size={t.patch}",
        f"model.image.kwargs.embed_dim={t.width}",
        f"model.image.kwargs.depth={t.depth}",
        f"model.image.kwargs.num_heads={t.heads}",
        f"model.image.kwargs.mlp_ratio={t.mlp_ratio}",
        f"model.text.config.hidden_size={t.text_width}",
        f"model.text.config.num_hidden_layers={text_layers}",
        f"model.text.config.num_attention_heads={t.text_heads}",
        f"model.text.config.intermediate_size={geglu_intermediate(t.text_width)}",
        "model.text.config.max_position_embeddings=128",
        "model.text.config.local_attention=128",
        "model.text.context_length=77",
        f"data.batch_size={batch}",
    ]


def image_tokens(size: str) -> int:
    return (224 // TOWERS[size].patch) ** 2 + 1


def gemm(size: str, batch: int) -> tuple[int, int, int]:
    """The ViT's MLP fc1 at ``batch`` images: (batch · tokens) × width @ width × mlp · width."""
    t = TOWERS[size]
    return batch * image_tokens(size), t.width, int(t.mlp_ratio * t.width)


def parameters(over: list[str]) -> int:
    """Parameters of the model the overrides build (on the meta device: no memory, no initialisation)."""
    import torch

    from mm_ptft.config import load_config
    from mm_ptft.models import create_model

    with torch.device("meta"):
        model = create_model(load_config(pt.CONFIG, over).model)
    return sum(p.numel() for p in model.parameters())


def launch(work: Path, name: str, stage: int, steps: int, over: list[str], reserve_mb: float) -> dict:
    """One bf16 launch on 2 ranks; its run directory (a large model's weights) is removed after."""
    row = pt.run_mm_ptft(work, name, stage, "bf16", steps, 2, over, min_available_mb=reserve_mb)
    shutil.rmtree(work / name, ignore_errors=True)
    return row


def scaling_rows(args, work: Path, data_over: list[str]) -> list[dict]:
    rows, limits = [], {}
    for size in args.sizes:
        limits[size] = pt.matmul_limit("bf16", 2, "cpu", gemm(size, args.batch))
        for layers in args.text_layers:
            over = data_over + overrides(size, layers, args.batch)
            n_params = parameters(over)
            flops = pt.flops_per_sample(over, 2)
            for stage in args.stages:
                name = f"ViT-{size} text {layers} z{stage}"
                print(f"running {name} ({n_params / 1e6:.1f} M parameters) …", flush=True)
                raw = launch(work, name.replace(" ", "_"), stage, args.steps, over, args.reserve_mb)
                raw["name"] = name
                row = pt.summarize(raw, args.warmup, flops, limits[size], 2, None, args.batch)
                row |= {"vit": size, "text_layers": layers, "stage": stage, "parameters": n_params}
                row |= {"flops_per_sample": flops, "matmul_limit_gflops": limits[size]}
                rows.append(row)
                print("  " + _line(row), flush=True)
    return rows


def largest_rows(args, work: Path, data_over: list[str]) -> list[dict]:
    rows = []
    for stage, ckpt in ((0, False), (3, True)):
        for size, layers in LARGEST:
            over = data_over + overrides(size, layers, 2) + [f"deepspeed.activation_checkpointing={str(ckpt).lower()}"]
            n_params = parameters(over)
            name = f"ViT-{size} text {layers} z{stage}" + (" ckpt" if ckpt else "")
            print(f"trying {name} ({n_params / 1e6:.0f} M parameters) …", flush=True)
            raw = launch(work, name.replace(" ", "_"), stage, 3, over, args.reserve_mb)
            raw["name"] = name
            row = pt.summarize(raw, 1, 0.0, None, 2, None, 2)
            row |= {"vit": size, "text_layers": layers, "stage": stage, "checkpointing": ckpt, "parameters": n_params}
            rows.append(row)
            print("  " + _line(row), flush=True)
            if "error" in row:
                break
    return rows


def _line(row: dict) -> str:
    if "error" in row:
        return f"{row['name']}: {row['error']}"
    pct = f", {row['pct_of_matmul_limit']:.1f} % of the limit" if row.get("pct_of_matmul_limit") else ""
    return f"{row['name']}: {row['samples_per_s']:.2f} samples/s{pct}, peak {row['peak_rss_mb']:.0f} MB / rank"


def print_tables(rows: list[dict], largest: list[dict]) -> None:
    if rows:
        print("\n| model | parameters | ZeRO | samples/s | % of limit | peak MB / rank |")
        print("|---|---:|---:|---:|---:|---:|")
        for r in rows:
            if "error" in r:
                print(f"| {r['name']} | {r['parameters'] / 1e6:.1f} M | {r['stage']} | {r['error']} | | |")
            else:
                print(
                    f"| ViT-{r['vit']} + text {r['text_layers']} | {r['parameters'] / 1e6:.1f} M | {r['stage']} | "
                    f"{r['samples_per_s']:.2f} | {r['pct_of_matmul_limit']:.1f} | {r['peak_rss_mb']:,.0f} |"
                )
    if largest:
        print("\n| tried | parameters | ZeRO | result |")
        print("|---|---:|---:|---|")
        for r in largest:
            result = (
                r["error"]
                if "error" in r
                else f"trains: {r['samples_per_s']:.2f} samples/s, {r['peak_rss_mb']:,.0f} MB / rank"
            )
            print(f"| {r['name']} | {r['parameters'] / 1e6:.0f} M | {r['stage']} | {result} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="*", default=["T", "S", "B"], choices=sorted(TOWERS))
    p.add_argument("--text-layers", type=int, nargs="*", default=[4, 12])
    p.add_argument("--stages", type=int, nargs="*", default=[0, 2, 3])
    p.add_argument("--batch", type=int, default=16, help="samples per rank of the scaling rows")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--largest", action="store_true", help="also find the largest model per stage by trying")
    p.add_argument("--reserve-mb", type=float, default=1500.0, help="stop a launch below this much available memory")
    p.add_argument("--data", default=str(ROOT / "data" / "fmnist"))
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    data = Path(args.data).resolve()
    if not (data / "dataset.json").is_file():
        sys.exit(f"error: {data} has no dataset.json; run `python -m data_tools fashion-mnist --out {data}`")
    work = Path(tempfile.mkdtemp(prefix="mm_ptft_scaling_"))
    data_over = [f"data.train={data}"]
    rows = scaling_rows(args, work, data_over) if args.sizes else []
    largest = largest_rows(args, work, data_over) if args.largest else []
    print_tables(rows, largest)
    result = {
        "device": "cpu",
        "ranks": 2,
        "precision": "bf16",
        "batch_per_rank": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "rows": rows,
        "largest": largest,
        "memory_total_mb": pt.meminfo_mb("MemTotal"),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"scaling-{time.strftime('%Y%m%d-%H%M')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
