"""Pretraining throughput: mm-ptft under DeepSpeed (ZeRO 0-3, fp32/bf16) vs open_clip_train, in one run.

    OMP_NUM_THREADS=1 python bench/pretrain_throughput.py [--steps 40] [--stages 0 1 2 3] [--precisions bf16 fp32]
                                                          [--open-clip] [--epoch] [--out bench/results/x.json]

Same Fashion-MNIST shards, same architecture (ViT 6×192 patch 4 on 28 px + text 4×192, context 32, embedding 128),
same global batch (128 per rank × 2 ranks). Reported per row: samples/s (median over steady-state steps; the first
``--warmup`` steps are excluded), model GFLOP/s (FLOPs per sample from torch.utils.flop_counter), % of the
matrix-product limit measured in this run under the same process layout, mean fraction of step time spent waiting
for data, and peak RSS of the largest rank. ``--epoch`` also trains one full epoch of the mm-ptft bf16 ZeRO-2 row and
of open_clip_train and reports both zero-shot top-1 on the 10k test images.

On a CUDA machine the same script runs one rank per GPU and reports TFLOP/s and MFU against the card's bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
BIN = Path(PY).parent
CONFIG = ROOT / "configs" / "pretrain-fmnist.yaml"
# bf16 dense peak per GPU (TFLOP/s), for MFU on a lent accelerator
GPU_BF16_PEAK = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "L40S": 362.0}
# ablations of the speed choices, each an extra bf16 ZeRO-2 row (--variants NAME …)
VARIANTS = {
    "fused-attn": ["model.fused_attn=true", "model.text.attn_implementation=sdpa"],  # SDPA flash kernel on CPU
    "amp_bf16": ["deepspeed.precision=amp_bf16"],  # fp32 weights + autocast (open_clip's numerics)
    "no-workers": ["data.workers=0"],  # decode + tokenize in the training process
    "2-workers": ["data.workers=2"],
    "patch-drop-50": ["model.image.patch_dropout=0.5"],  # FLIP: half the patch tokens dropped in training
    "patch-drop-75": ["model.image.patch_dropout=0.75"],
}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(threads: int) -> dict:
    return dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")


def _cuda() -> tuple[int, str | None]:
    import torch

    if not torch.cuda.is_available():
        return 0, None
    return torch.cuda.device_count(), torch.cuda.get_device_name(0)


# ------------------------------------------------------------------------------------------------ matmul limit
_MATMUL_CHILD = r"""
import sys, time, torch
torch.set_num_threads(1)
dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[sys.argv[1]]
dev = sys.argv[2]
m, k, n = 6400, 192, 768   # the towers' dominant shape: (batch × tokens) × width → 4 × width
a, b = torch.randn(m, k, dtype=dtype, device=dev), torch.randn(k, n, dtype=dtype, device=dev)
for _ in range(3): a @ b
if dev == "cuda": torch.cuda.synchronize()
t, reps = time.perf_counter(), 0
while time.perf_counter() - t < float(sys.argv[3]):
    for _ in range(10): a @ b
    reps += 10
if dev == "cuda": torch.cuda.synchronize()
print(2 * m * k * n * reps / (time.perf_counter() - t) / 1e9)
"""


def matmul_limit(dtype: str, procs: int, device: str, seconds: float = 4.0) -> float:
    """GFLOP/s per process for the towers' typical GEMM, with ``procs`` processes running at once (1 thread each)."""
    children = [
        subprocess.Popen(
            [PY, "-c", _MATMUL_CHILD, dtype, device, str(seconds)], stdout=subprocess.PIPE, env=_env(1), text=True
        )
        for _ in range(procs)
    ]
    return statistics.mean(float(c.communicate()[0].strip()) for c in children)


# ----------------------------------------------------------------------------------------------- FLOPs/sample
def flops_per_sample(overrides: list[str]) -> float:
    """Training FLOPs (forward + backward) per sample of the mm-ptft model, by torch's FLOP counter."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mm_ptft.config import load_config
    from mm_ptft.models import create_model

    cfg = load_config(CONFIG, overrides)
    model = create_model(cfg.model)
    batch = 8
    image = torch.randn(batch, cfg.model.image.in_chans, cfg.model.image.image_size, cfg.model.image.image_size)
    ids = torch.randint(0, 1000, (batch, cfg.model.text.context_length))
    with FlopCounterMode(display=False) as counter:
        out = model(image, ids, torch.ones_like(ids))
        logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
        labels = torch.arange(batch)
        loss = torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels)
        loss.backward()
    return counter.get_total_flops() / batch


def open_clip_flops_per_sample(context_length: int = 32) -> float:
    """The same count for open_clip's CLIP built from OPEN_CLIP_MODEL (its own text transformer and ViT)."""
    import open_clip
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model = open_clip.model.CLIP(**OPEN_CLIP_MODEL)
    batch = 8
    size = OPEN_CLIP_MODEL["vision_cfg"]["image_size"]
    image = torch.randn(batch, 3, size, size)
    ids = torch.randint(1, 1000, (batch, context_length))
    with FlopCounterMode(display=False) as counter:
        image_features, text_features, logit_scale = model(image, ids)[:3]
        logits = logit_scale * image_features @ text_features.T
        labels = torch.arange(batch)
        loss = torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels)
        loss.backward()
    return counter.get_total_flops() / batch


# ---------------------------------------------------------------------------------------------- mm-ptft rows
def run_mm_ptft(out: Path, name: str, stage: int, precision: str, steps: int, nproc: int, extra: list[str]) -> dict:
    run_dir = out / name
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [
        f"train.output_dir={out}",
        f"train.name={name}",
        f"deepspeed.zero_stage={stage}",
        f"deepspeed.precision={precision}",
        "train.progress=false",
        "train.report=false",
        "train.tensorboard=false",
        "train.save_every=0",
        "train.log_every=1",
        *extra,
    ]
    if steps:
        overrides += [f"train.steps={steps}", "train.consolidate=false", "eval.data=null"]
    cmd = [
        BIN / "deepspeed",
        "--num_gpus",
        str(nproc),
        "--master_port",
        str(_port()),
        "--module",
        "mm_ptft",
        "train",
        "-c",
        str(CONFIG),
        *overrides,
    ]
    log = out / f"{name}.log"
    t0 = time.time()
    with log.open("w") as f:
        code = subprocess.run(cmd, cwd=ROOT, env=_env(1), stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        return {"name": name, "error": f"exit {code}, see {log}"}
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    return {
        "name": name,
        "wall_s": time.time() - t0,
        "step_s": [r["step_time_s"] for r in train],
        "data_wait": [r["data_wait_frac"] for r in train],
        "peak_rss_mb": max(r.get("peak_rss_mb") or 0 for r in train),
        "zeroshot_top1": next((r.get("zeroshot/acc1") for r in reversed(records) if "zeroshot/acc1" in r), None),
    }


# -------------------------------------------------------------------------------------------- open_clip rows
_OPEN_CLIP_WRAPPER = r'''
"""Run open_clip_train on CPU: its DDP call passes device_ids=[cpu], which torch rejects; drop it there."""
import json, os, resource, sys, torch
import open_clip
_DDP = torch.nn.parallel.DistributedDataParallel
class _CpuSafeDDP(_DDP):
    def __init__(self, module, device_ids=None, **kw):
        if device_ids and str(device_ids[0]).startswith("cpu"):
            device_ids = None
        super().__init__(module, device_ids=device_ids, **kw)
torch.nn.parallel.DistributedDataParallel = _CpuSafeDDP
torch.set_num_threads(1)
open_clip.add_model_config(sys.argv[1])
from open_clip_train.main import main
try:
    # --logs is passed here, not on torchrun's command line: torchrun takes it for a prefix of its --logs-specs
    main(sys.argv[2:] + ["--logs", os.environ["BENCH_LOGS"]])
finally:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open(os.path.join(os.environ["BENCH_OUT"], f"rss_{os.environ.get('RANK', '0')}.txt"), "w") as f:
        f.write(str(rss))
'''

OPEN_CLIP_MODEL = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 28, "patch_size": 4, "width": 192, "layers": 6, "head_width": 64, "mlp_ratio": 4.0},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 192, "heads": 3, "layers": 4},
}


def run_open_clip(out: Path, name: str, steps: int, nproc: int, data: Path, samples: int) -> dict:
    try:
        import open_clip_train  # noqa: F401
    except ImportError:
        return {"name": name, "error": "open_clip_train not installed (pip install 'open_clip_torch[training]')"}
    work = out / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cfg_dir = work / "model_configs"
    cfg_dir.mkdir()
    (cfg_dir / "fmnist-vit-6x192.json").write_text(json.dumps(OPEN_CLIP_MODEL))
    wrapper = work / "run_open_clip.py"
    wrapper.write_text(_OPEN_CLIP_WRAPPER)
    shards = sorted((data / "train").glob("shard-*.tar"))
    pattern = f"{data}/train/shard-{{{shards[0].stem.split('-')[1]}..{shards[-1].stem.split('-')[1]}}}.tar"
    n_samples = steps * 128 * nproc if steps else samples
    args = [
        "--model",
        "fmnist-vit-6x192",
        "--train-data",
        pattern,
        "--dataset-type",
        "webdataset",
        "--train-num-samples",
        str(n_samples),
        "--batch-size",
        "128",
        "--epochs",
        "1",
        "--lr",
        "1e-3",
        "--wd",
        "0.2",
        "--warmup",
        "20",
        "--precision",
        "amp_bf16",
        "--workers",
        "1",
        "--log-every-n-steps",
        "1",
        "--save-frequency",
        "1" if not steps else "0",
        "--name",
        "run",
        "--report-to",
        "",
        "--seed",
        "0",
        "--gather-with-grad",
    ]
    cmd = [
        BIN / "torchrun",
        "--nproc-per-node",
        str(nproc),
        "--master-port",
        str(_port()),
        str(wrapper),
        str(cfg_dir / "fmnist-vit-6x192.json"),
        *args,
    ]
    log = out / f"{name}.log"
    env = dict(_env(1), BENCH_OUT=str(work), BENCH_LOGS=str(work / "logs"))
    t0 = time.time()
    with log.open("w") as f:
        code = subprocess.run(cmd, cwd=work, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    text = log.read_text()
    rates = [float(m) for m in re.findall(r"Batch \(t\): [0-9.]+, ([0-9.]+)/s,", text)]
    if code != 0 or not rates:
        return {"name": name, "error": f"exit {code}, see {log}"}
    waits = [float(d) / float(b) for d, b in re.findall(r"Data \(t\): ([0-9.]+) Batch \(t\): ([0-9.]+)", text)]
    rss = [float((work / f).read_text()) for f in os.listdir(work) if f.startswith("rss_")]
    result = {
        "name": name,
        "wall_s": time.time() - t0,
        "step_s": [128 * nproc / r for r in rates],
        "data_wait": waits,
        "peak_rss_mb": max(rss) if rss else None,
        "zeroshot_top1": None,
    }
    if not steps:
        ckpts = sorted((work / "logs" / "run" / "checkpoints").glob("epoch_*.pt"))
        if ckpts:
            result["zeroshot_top1"] = open_clip_zeroshot(ckpts[-1], data)
    return result


def open_clip_zeroshot(checkpoint: Path, data: Path) -> float:
    """Zero-shot top-1 of an open_clip checkpoint on the test shards, with the same class names and templates."""
    import io
    import tarfile

    import open_clip
    import torch
    from PIL import Image

    open_clip.add_model_config(checkpoint.parents[3] / "model_configs" / "fmnist-vit-6x192.json")
    model, _, preprocess = open_clip.create_model_and_transforms("fmnist-vit-6x192", pretrained=str(checkpoint))
    tokenizer = open_clip.get_tokenizer("fmnist-vit-6x192")
    meta = json.loads((data / "dataset.json").read_text())
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        classifier = open_clip.build_zero_shot_classifier(model, tokenizer, meta["classnames"], meta["templates"])
        correct = total = 0
        for shard in sorted((data / "test").glob("*.tar")):
            images, labels = [], []
            with tarfile.open(shard) as tar:
                members = {m.name: m for m in tar.getmembers()}
                for name in members:
                    if name.endswith(".png"):
                        key = name[:-4]
                        images.append(preprocess(Image.open(io.BytesIO(tar.extractfile(members[name]).read()))))
                        labels.append(json.loads(tar.extractfile(members[key + ".json"]).read())["label"])
            feats = torch.nn.functional.normalize(model.encode_image(torch.stack(images)).float(), dim=-1)
            correct += (feats @ classifier.float()).argmax(1).eq(torch.tensor(labels)).sum().item()
            total += len(labels)
    return correct / total


# ---------------------------------------------------------------------------------------------------- report
def summarize(row: dict, warmup: int, flops: float, limit: float | None, nproc: int, gpu: str | None) -> dict:
    if "error" in row:
        return row
    steady = row["step_s"][warmup:] or row["step_s"]
    step = statistics.median(steady)
    sps = 128 * nproc / step
    gflops = sps * flops / 1e9
    out = {
        "name": row["name"],
        "samples_per_s": sps,
        "gflop_s": gflops,
        "data_wait_pct": 100 * statistics.mean(row["data_wait"][warmup:] or row["data_wait"]),
        "peak_rss_mb": row["peak_rss_mb"],
        "zeroshot_top1": row.get("zeroshot_top1"),
        "wall_s": row["wall_s"],
    }
    if limit:
        out["pct_of_matmul_limit"] = 100 * gflops / (limit * nproc)
    if gpu:
        peak = next((v for k, v in GPU_BF16_PEAK.items() if k in gpu), None)
        out["tflop_s"] = gflops / 1e3
        out["mfu_pct"] = 100 * gflops / 1e3 / (peak * nproc) if peak else None
    return out


def print_table(rows: list[dict], limits: dict, flops: dict) -> None:
    print(
        "\nFLOPs per sample (fwd+bwd): "
        + ", ".join(f"{k} {v / 1e9:.3f} GFLOP" for k, v in flops.items())
        + ";  matrix-product limit per process: "
        + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in limits.items())
    )
    columns = [("samples/s", 11), ("GFLOP/s", 10), ("% limit", 9), ("data wait", 11), ("peak RSS", 10)]
    columns.append(("zero-shot", 11))
    head = f"{'run':<22}" + "".join(f"{name:>{width}}" for name, width in columns)
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['name']:<22}  {r['error']}")
            continue
        zs = f"{r['zeroshot_top1']:.4f}" if r.get("zeroshot_top1") is not None else "-"
        pct = f"{r['pct_of_matmul_limit']:.1f}" if r.get("pct_of_matmul_limit") is not None else "-"
        rss = f"{r['peak_rss_mb']:.0f} MB" if r.get("peak_rss_mb") else "-"
        print(
            f"{r['name']:<22}{r['samples_per_s']:>11.1f}{r['gflop_s']:>10.1f}{pct:>9}{r['data_wait_pct']:>10.1f}%"
            f"{rss:>10}{zs:>11}"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=40, help="steps per speed row")
    p.add_argument("--warmup", type=int, default=8, help="steps excluded from the median")
    p.add_argument("--stages", type=int, nargs="*", default=[0, 1, 2, 3])
    p.add_argument("--precisions", nargs="*", default=["bf16", "fp32"])
    p.add_argument("--variants", nargs="*", default=[], choices=sorted(VARIANTS), help="ablation rows (bf16 ZeRO-2)")
    p.add_argument("--open-clip", action="store_true", help="also time open_clip_train (amp_bf16, torchrun)")
    p.add_argument("--epoch", action="store_true", help="one-epoch quality runs: mm-ptft bf16 ZeRO-2 and open_clip")
    p.add_argument("--data", default=str(ROOT / "data" / "fmnist"))
    p.add_argument("--out", default=None, help="JSON results (default bench/results/pretrain_throughput-<time>.json)")
    p.add_argument("--extra", nargs="*", default=[], help="dotted overrides for every mm-ptft row")
    args = p.parse_args(argv)

    n_gpu, gpu = _cuda()
    nproc = n_gpu or 2
    device = "cuda" if n_gpu else "cpu"
    data = Path(args.data).resolve()
    if not (data / "dataset.json").is_file():
        sys.exit(f"error: {data} has no dataset.json; run `python -m data_tools fashion-mnist --out {data}`")
    work = Path(tempfile.mkdtemp(prefix="mm_ptft_bench_"))
    print(f"device: {gpu or 'cpu'} × {nproc} ranks; work dir {work}", flush=True)

    limits = {dt: matmul_limit(dt, nproc, device) for dt in ("bf16", "fp32")}
    data_override = [f"data.train={data}", f"eval.data={data}"]
    flops = {"mm-ptft": flops_per_sample(data_override + args.extra)}
    if args.open_clip or args.epoch:
        flops["open_clip"] = open_clip_flops_per_sample()
    raw = []
    for precision in args.precisions:
        for stage in args.stages:
            name = f"mm-ptft z{stage} {precision}"
            print(f"running {name} …", flush=True)
            row = run_mm_ptft(
                work, name.replace(" ", "_"), stage, precision, args.steps, nproc, data_override + args.extra
            )
            row["name"], row["precision"] = name, precision
            raw.append(row)
    for variant in args.variants:
        name = f"mm-ptft z2 {variant}"
        print(f"running {name} …", flush=True)
        row = run_mm_ptft(
            work, name.replace(" ", "_"), 2, "bf16", args.steps, nproc, data_override + args.extra + VARIANTS[variant]
        )
        row["name"], row["precision"] = name, "bf16"
        raw.append(row)
    if args.open_clip:
        print("running open_clip_train amp_bf16 …", flush=True)
        raw.append(run_open_clip(work, "open_clip amp_bf16", args.steps, nproc, data, 60000))
    if args.epoch:
        print("one epoch: mm-ptft bf16 ZeRO-2 …", flush=True)
        row = run_mm_ptft(work, "epoch_mm-ptft", 2, "bf16", 0, nproc, data_override + ["eval.every=0"] + args.extra)
        row["name"], row["precision"] = "mm-ptft z2 bf16 epoch", "bf16"
        raw.append(row)
        print("one epoch: open_clip_train …", flush=True)
        raw.append(run_open_clip(work, "open_clip epoch", 0, nproc, data, 60000))

    rows = []
    for row in raw:
        precision = row.get("precision", "bf16")
        row_flops = flops["open_clip" if row["name"].startswith("open_clip") else "mm-ptft"]
        limit = limits["fp32" if precision == "fp32" else "bf16"]
        rows.append(summarize(row, args.warmup, row_flops, limit, nproc, gpu))
    print_table(rows, limits, flops)
    result = {
        "device": gpu or "cpu",
        "ranks": nproc,
        "flops_per_sample": flops,
        "matmul_limit_gflops": limits,
        "steps": args.steps,
        "warmup": args.warmup,
        "rows": rows,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "extra": args.extra,
    }
    stamp = time.strftime("%Y%m%d-%H%M")
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"pretrain_throughput-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
