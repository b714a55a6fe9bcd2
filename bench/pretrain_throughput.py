"""Pretraining throughput: mm-ptft under DeepSpeed (ZeRO 0-3, fp32/bf16) vs open_clip_train, in one run.

    OMP_NUM_THREADS=1 python bench/pretrain_throughput.py [--shape fm-vit-t|b16] [--batch N] [--steps 40]
                                                          [--stages 0 1 2 3] [--precisions bf16 fp32] [--open-clip]
                                                          [--epoch] [--profile] [--out bench/results/x.json]

Same Fashion-MNIST shards, same architecture, same global batch for both trainers. ``--shape fm-vit-t`` (the default):
ViT 6×192 patch 4 on 28 px + text 4×192, context 32, embedding 128, 128 per rank × 2 ranks. ``--shape b16``: ViT-B/16
at 224 px (the 28-px images upsampled by each trainer's own preprocessing) + text 12×512, context 77, embedding 512,
as open_clip's ViT-B-16, 16 per rank. Reported per row: samples/s (median over steady-state steps; the first
``--warmup`` steps are excluded), model GFLOP/s (FLOPs per sample from torch.utils.flop_counter), % of the
matrix-product limit measured in this run at the shape's dominant GEMM under the same process layout, mean fraction
of step time spent waiting for data, and peak RSS of the largest rank. ``--epoch`` also trains one full epoch of the
mm-ptft bf16 ZeRO-2 row and of open_clip_train and reports both zero-shot top-1 on the 10k test images. ``--profile``
runs one more mm-ptft bf16 ZeRO-2 launch whose step after ``--warmup`` runs under torch.profiler on rank 0, and
prints that step's self time by category (matrix products, attention, elementwise, optimizer, …).

On a CUDA machine the same script runs one rank per GPU and reports TFLOP/s and MFU against the card's bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

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


# ------------------------------------------------------------------------------------------------------ shapes
class Shape(NamedTuple):
    """One benchmarked architecture, built by each trainer its own way: mm-ptft from configs/pretrain-fmnist.yaml with
    ``overrides``, open_clip from ``open_clip_model`` (a model config dict registered as ``open_clip_name``)."""

    about: str  # one line for the table and the JSON
    batch: int  # default samples per rank, both trainers (--batch overrides it)
    image_tokens: int  # patches + class token of the ViT
    width: int  # ViT width: the dominant GEMM is (batch · image_tokens × width) @ (width × 4 · width), the MLP's fc1
    count_batch: int  # batch of the FLOP count (per sample it barely depends on it: only the loss's B × B logits)
    overrides: tuple[str, ...]
    open_clip_name: str
    open_clip_model: dict

    def gemm(self, batch: int) -> tuple[int, int, int]:
        """(m, k, n) of the towers' dominant matrix product at ``batch`` samples per process."""
        return batch * self.image_tokens, self.width, 4 * self.width


OPEN_CLIP_MODEL = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 28, "patch_size": 4, "width": 192, "layers": 6, "head_width": 64, "mlp_ratio": 4.0},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 192, "heads": 3, "layers": 4},
}
# open_clip's model_configs/ViT-B-16.json (head width 64 → 12 vision heads, MLP ratio 4 in both towers by default)
OPEN_CLIP_B16 = {
    "embed_dim": 512,
    "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12},
}
# mm-ptft's ViT-B-16 twin, as overrides of configs/pretrain-fmnist.yaml (its init, pooling and optimizer kept)
B16_OVERRIDES = (
    "model.embed_dim=512",
    # timm ViT-B/16 at 224 px: 14 × 14 = 196 patches + class token, 12 blocks × 768, 12 heads, MLP 4 × 768 = 3072
    "model.image.name=vit_base_patch16_224",
    "model.image.image_size=224",
    "model.image.kwargs.patch_size=16",
    "model.image.kwargs.embed_dim=768",
    "model.image.kwargs.depth=12",
    "model.image.kwargs.num_heads=12",
    # ModernBERT 12 × 512, 8 heads. Its GeGLU MLP with intermediate_size I is Wi: 512 → 2·I (value and gate) then
    # Wo: I → 512, i.e. 3 · 512 · I weights per layer; I = 1368 ≈ 2/3 × 2048 (a multiple of 8) matches open_clip's
    # GELU MLP 512 → 2048 → 512 (2 · 512 · 2048) in parameters and FLOPs within 0.2 %, as the recipe's 512 = 2/3 × 768
    "model.text.config.hidden_size=512",
    "model.text.config.num_hidden_layers=12",
    "model.text.config.num_attention_heads=8",
    "model.text.config.intermediate_size=1368",
    "model.text.config.max_position_embeddings=128",  # rotary table; ≥ the context
    "model.text.config.local_attention=128",  # unused: every layer attends globally (global_attn_every_n_layers 1)
    "model.text.context_length=77",
)
SHAPES = {
    "fm-vit-t": Shape(
        about="ViT 6×192 patch 4 on 28 px + text 4×192, context 32, embedding 128",
        batch=128,
        image_tokens=50,
        width=192,
        count_batch=8,
        overrides=(),
        open_clip_name="fmnist-vit-6x192",
        open_clip_model=OPEN_CLIP_MODEL,
    ),
    "b16": Shape(
        about="ViT-B/16 on 224 px (28 px upsampled) + text 12×512, context 77, embedding 512 (open_clip ViT-B-16)",
        batch=16,
        image_tokens=197,
        width=768,
        count_batch=2,
        overrides=B16_OVERRIDES,
        open_clip_name="fmnist-vit-b-16",
        open_clip_model=OPEN_CLIP_B16,
    ),
}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(threads: int) -> dict:
    return dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")


def meminfo_mb(field: str = "MemAvailable") -> float:
    """The machine's available memory (or another ``field`` of /proc/meminfo, e.g. MemTotal), MB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/meminfo")


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
m, k, n = (int(x) for x in sys.argv[4:7])   # the towers' dominant shape: (batch × tokens) × width → 4 × width
a, b = torch.randn(m, k, dtype=dtype, device=dev), torch.randn(k, n, dtype=dtype, device=dev)
for _ in range(3): a @ b
if dev.startswith("cuda"): torch.cuda.synchronize(dev)
t, reps = time.perf_counter(), 0
while time.perf_counter() - t < float(sys.argv[3]):
    for _ in range(10): a @ b
    reps += 10
if dev.startswith("cuda"): torch.cuda.synchronize(dev)
print(2 * m * k * n * reps / (time.perf_counter() - t) / 1e9)
"""


def matmul_limit(dtype: str, procs: int, device: str, gemm: tuple[int, int, int], seconds: float = 4.0) -> float:
    """GFLOP/s per process for the towers' dominant GEMM ``gemm`` = (m, k, n), with ``procs`` processes running at
    once (1 thread each; on CUDA one process per GPU, as the ranks)."""
    devices = [f"cuda:{i}" for i in range(procs)] if device == "cuda" else [device] * procs
    children = [
        subprocess.Popen(
            [PY, "-c", _MATMUL_CHILD, dtype, dev, str(seconds), *map(str, gemm)],
            stdout=subprocess.PIPE,
            env=_env(1),
            text=True,
        )
        for dev in devices
    ]
    return statistics.mean(float(c.communicate()[0].strip()) for c in children)


# ----------------------------------------------------------------------------------------------- FLOPs/sample
def flops_per_sample(overrides: list[str], batch: int = 8) -> float:
    """Training FLOPs (forward + backward) per sample of the mm-ptft model, by torch's FLOP counter."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mm_ptft.config import load_config
    from mm_ptft.models import create_model

    cfg = load_config(CONFIG, overrides)
    model = create_model(cfg.model)
    image = torch.randn(batch, cfg.model.image.in_chans, cfg.model.image.image_size, cfg.model.image.image_size)
    ids = torch.randint(0, 1000, (batch, cfg.model.text.context_length))
    with FlopCounterMode(display=False) as counter:
        out = model(image, ids, torch.ones_like(ids))
        logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
        labels = torch.arange(batch)
        loss = torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels)
        loss.backward()
    return counter.get_total_flops() / batch


def open_clip_flops_per_sample(model_cfg: dict = OPEN_CLIP_MODEL, batch: int = 8) -> float:
    """The same count for open_clip's CLIP built from ``model_cfg`` (its own text transformer and ViT)."""
    import open_clip
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model = open_clip.model.CLIP(**model_cfg)
    size = model_cfg["vision_cfg"]["image_size"]
    image = torch.randn(batch, 3, size, size)
    ids = torch.randint(1, 1000, (batch, model_cfg["text_cfg"]["context_length"]))
    with FlopCounterMode(display=False) as counter:
        image_features, text_features, logit_scale = model(image, ids)[:3]
        logits = logit_scale * image_features @ text_features.T
        labels = torch.arange(batch)
        loss = torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels)
        loss.backward()
    return counter.get_total_flops() / batch


# ---------------------------------------------------------------------------------------------- mm-ptft rows
def run_mm_ptft(
    out: Path,
    name: str,
    stage: int,
    precision: str,
    steps: int,
    nproc: int,
    extra: list[str],
    script: Path | None = None,
    env: dict | None = None,
    min_available_mb: float | None = None,
) -> dict:
    """One ``deepspeed --module mm_ptft train`` launch (or of ``script``, which takes the same arguments). With
    ``min_available_mb`` the launch is killed when the machine's available memory falls below it (a model that does
    not fit ends as an ``out of memory`` row instead of waking the kernel's OOM killer)."""
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
        *(["--module", "mm_ptft"] if script is None else [str(script)]),
        "train",
        "-c",
        str(CONFIG),
        *overrides,
    ]
    log = out / f"{name}.log"
    t0 = time.time()
    with log.open("w") as f:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=dict(_env(1), **(env or {})),
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the launcher and its ranks are stopped together
        )
        while proc.poll() is None:
            time.sleep(0.1)
            if min_available_mb is not None and meminfo_mb() < min_available_mb:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return {"name": name, "error": f"out of memory (available fell below {min_available_mb:.0f} MB)"}
        code = proc.returncode
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


# ------------------------------------------------------------------------------------------------------ profile
_PROFILE_WRAPPER = r'''
"""mm-ptft train, with rank 0's step number BENCH_PROFILE_STEP (0-based) under torch.profiler; the step's ops
(self time by name and by enclosing region) go to BENCH_PROFILE_OUT as JSON."""
import json, os, sys, time
from collections import defaultdict
import torch
from torch.profiler import ProfilerActivity, profile, record_function
from mm_ptft.cli import main
from mm_ptft.train.trainer import Trainer

PROFILED = int(os.environ["BENCH_PROFILE_STEP"])
PHASES = ("forward", "backward", "step")  # the DeepSpeed engine calls of a step, labelled as regions
_train_step = Trainer.train_step

def _labelled(label, fn):
    def call(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)
    return call

def _region(event):
    # the enclosing region that decides an op's category whatever its name: the optimizer's or the data loader's
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("Optimizer."):
            return "optimizer"
        if parent.name.startswith("enumerate(DataLoader)"):
            return "data"
        parent = parent.cpu_parent
    return ""

def train_step(self, batches):
    if self.step != PROFILED or self.rank != 0:
        return _train_step(self, batches)
    cuda = self.device.type == "cuda"
    for phase in PHASES:
        setattr(self.engine, phase, _labelled(f"bench.{phase}", getattr(self.engine, phase)))
    try:
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            t0 = time.perf_counter()
            out, data_time = _train_step(self, batches)
            if cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
    finally:
        for phase in PHASES:
            delattr(self.engine, phase)
    ops, phases = defaultdict(lambda: [0.0, 0.0, 0]), defaultdict(float)
    for event in prof.events():
        op = ops[(event.name, _region(event))]
        op[0] += event.self_cpu_time_total / 1e3
        op[1] += getattr(event, "self_device_time_total", 0.0) / 1e3
        op[2] += 1
        if event.name.startswith("bench."):
            phases[event.name[6:]] += event.cpu_time_total / 1e3
    result = {
        "device": self.device.type,
        "wall_ms": wall * 1e3,
        "data_time_ms": data_time * 1e3,
        "phases_ms": phases,
        "ops": [{"name": n, "region": r, "cpu_ms": c, "device_ms": d, "count": k} for (n, r), (c, d, k) in ops.items()],
    }
    with open(os.environ["BENCH_PROFILE_OUT"], "w") as f:
        json.dump(result, f)
    return out, data_time

Trainer.train_step = train_step
sys.exit(main(sys.argv[1:]))
'''

PROFILE_CATEGORIES = (
    "matrix products",
    "attention",
    "elementwise + normalisation",
    "optimizer",
    "communication",
    "data wait",
)
_MATRIX = re.compile(
    r"aten::(mm|addmm|_addmm_activation|bmm|baddbmm|addbmm|matmul|linear|dot|mv|addmv|einsum|"
    r"_?convolution\w*|conv\w*|mkldnn_convolution\w*|cudnn_convolution\w*)"
)
_ATTENTION = re.compile(r".*(softmax|scaled_dot_product|flash_attention|efficient_attention|cudnn_attention)")
_COMMUNICATION = re.compile(r".*(gloo|nccl|c10d|all_reduce|allreduce|reduce_scatter|all_gather|allgather|broadcast)")
# views, allocations and scalar reads: dispatcher work, left in "Python / other" with the autograd engine's own time
_NO_COMPUTE = re.compile(
    r"aten::(view|_unsafe_view|reshape|_reshape_alias|transpose|t|permute|expand|expand_as|slice|select|as_strided|"
    r"unsqueeze|squeeze|split|split_with_sizes|chunk|unbind|narrow|detach|detach_|alias|empty|empty_strided|"
    r"empty_like|new_empty|new_empty_strided|resize_|set_|lift_fresh|result_type|is_nonzero|item|"
    r"_local_scalar_dense|numel|size|stride)"
)


def profile_category(name: str, region: str) -> str | None:
    """The category of one profiled op (None: "Python / other"), by its enclosing region first, then its name."""
    if region == "data" or name.startswith("enumerate(DataLoader)"):
        return "data wait"
    if region == "optimizer" or name.startswith("Optimizer.") or "_foreach_" in name or "fused_adam" in name:
        return "optimizer"
    if _COMMUNICATION.match(name):
        return "communication"
    if _ATTENTION.match(name):
        return "attention"
    if _MATRIX.fullmatch(name):
        return "matrix products"
    if name.startswith("aten::") and not _NO_COMPUTE.fullmatch(name):
        return "elementwise + normalisation"
    return None


def profile_table(profiled: dict) -> dict:
    """Self time of the profiled step's ops by category; "Python / other" is the step's wall time minus them all."""
    cpu = dict.fromkeys(PROFILE_CATEGORIES, 0.0)
    device = dict.fromkeys(PROFILE_CATEGORIES, 0.0)
    other: dict[str, float] = {}
    for op in profiled["ops"]:
        category = profile_category(op["name"], op["region"])
        if category is None:
            other[op["name"]] = other.get(op["name"], 0.0) + op["cpu_ms"]
        else:
            cpu[category] += op["cpu_ms"]
            device[category] += op["device_ms"]
    wall = profiled["wall_ms"]
    rows = [{"category": c, "ms": cpu[c], "share": cpu[c] / wall} for c in PROFILE_CATEGORIES]
    rest = max(wall - sum(cpu.values()), 0.0)
    rows.append({"category": "Python / other", "ms": rest, "share": rest / wall})
    if profiled["device"] == "cuda":
        for row in rows[:-1]:
            row["device_ms"] = device[row["category"]]
    return {
        "wall_ms": wall,
        "device": profiled["device"],
        "phases_ms": profiled["phases_ms"],
        "rows": rows,
        # the largest uncategorised self times, to check that nothing that computes was left out
        "largest_other_ops_ms": dict(sorted(other.items(), key=lambda kv: -kv[1])[:8]),
    }


def run_profile(out: Path, warmup: int, nproc: int, extra: list[str]) -> dict:
    """A bf16 ZeRO-2 launch of ``warmup`` + 1 steps whose last step runs under torch.profiler on rank 0."""
    wrapper = out / "run_mm_ptft_profiled.py"
    wrapper.write_text(_PROFILE_WRAPPER)
    result = out / "profile.json"
    env = {"BENCH_PROFILE_STEP": str(warmup), "BENCH_PROFILE_OUT": str(result)}
    row = run_mm_ptft(out, "profile_mm-ptft", 2, "bf16", warmup + 1, nproc, extra, script=wrapper, env=env)
    if "error" in row:
        return row
    table = profile_table(json.loads(result.read_text()))
    table["unprofiled_step_ms"] = [1e3 * s for s in row["step_s"][:-1]]
    return table


def print_profile(table: dict) -> None:
    if "error" in table:
        print(f"\nprofile: {table['error']}")
        return
    cuda = table["device"] == "cuda"
    before = table["unprofiled_step_ms"]
    print(
        f"\nProfiled step (mm-ptft bf16 ZeRO-2, rank 0, torch.profiler): {table['wall_ms']:.0f} ms"
        + (f" (the step before, unprofiled: {before[-1]:.0f} ms)" if before else "")
        + "; engine "
        + ", ".join(f"{k} {v:.0f} ms" for k, v in table["phases_ms"].items())
    )
    print("\n| category | self CPU ms | share |" + (" GPU ms |" if cuda else ""))
    print("|---|---:|---:|" + ("---:|" if cuda else ""))
    for row in table["rows"]:
        gpu = f" {row['device_ms']:.1f} |" if "device_ms" in row else (" |" if cuda else "")
        print(f"| {row['category']} | {row['ms']:.1f} | {100 * row['share']:.1f} % |{gpu}")


# -------------------------------------------------------------------------------------------- open_clip rows
_OPEN_CLIP_WRAPPER = r'''
"""Run open_clip_train here: on CPU its DDP call passes device_ids=[cpu], which torch rejects (dropped there); the
shard-end markers of newer webdataset break its sample grouping (not yielded)."""
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
import inspect
import open_clip_train.data as _data
# webdataset 0.2.111 (installed here) ends every shard with an empty {} marker, which group_by_keys_nothrow reads as
# a file (KeyError 'fname'); without it samples group as in older webdataset (a new shard starts a new key anyway)
_expand = _data.tar_file_expander
if "eof_value" in inspect.signature(_expand).parameters:
    _data.tar_file_expander = lambda *a, **kw: _expand(*a, **kw, eof_value=None)
from open_clip_train.main import main
try:
    # --logs is passed here, not on torchrun's command line: torchrun takes it for a prefix of its --logs-specs
    main(sys.argv[2:] + ["--logs", os.environ["BENCH_LOGS"]])
finally:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open(os.path.join(os.environ["BENCH_OUT"], f"rss_{os.environ.get('RANK', '0')}.txt"), "w") as f:
        f.write(str(rss))
'''


def run_open_clip(
    out: Path, name: str, steps: int, nproc: int, data: Path, samples: int, shape: Shape, batch: int
) -> dict:
    """One ``torchrun open_clip_train`` launch of ``shape``'s open_clip model at ``batch`` samples per rank."""
    try:
        import open_clip_train  # noqa: F401
    except ImportError:
        return {"name": name, "error": "open_clip_train not installed (pip install 'open_clip_torch[training]')"}
    work = out / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cfg_dir = work / "model_configs"
    cfg_dir.mkdir()
    model_file = cfg_dir / f"{shape.open_clip_name}.json"
    model_file.write_text(json.dumps(shape.open_clip_model))
    wrapper = work / "run_open_clip.py"
    wrapper.write_text(_OPEN_CLIP_WRAPPER)
    shards = sorted((data / "train").glob("shard-*.tar"))
    pattern = f"{data}/train/shard-{{{shards[0].stem.split('-')[1]}..{shards[-1].stem.split('-')[1]}}}.tar"
    n_samples = steps * batch * nproc if steps else samples
    args = [
        "--model",
        shape.open_clip_name,
        "--train-data",
        pattern,
        "--dataset-type",
        "webdataset",
        "--train-num-samples",
        str(n_samples),
        "--batch-size",
        str(batch),
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
        str(model_file),
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
        "step_s": [batch * nproc / r for r in rates],
        "data_wait": waits,
        "peak_rss_mb": max(rss) if rss else None,
        "zeroshot_top1": None,
    }
    if not steps:
        ckpts = sorted((work / "logs" / "run" / "checkpoints").glob("epoch_*.pt"))
        if ckpts:
            result["zeroshot_top1"] = open_clip_zeroshot(ckpts[-1], data, shape.open_clip_name)
    return result


def open_clip_zeroshot(checkpoint: Path, data: Path, model_name: str) -> float:
    """Zero-shot top-1 of an open_clip checkpoint on the test shards, with the same class names and templates."""
    import io
    import tarfile

    import open_clip
    import torch
    from PIL import Image

    open_clip.add_model_config(checkpoint.parents[3] / "model_configs" / f"{model_name}.json")
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(checkpoint))
    tokenizer = open_clip.get_tokenizer(model_name)
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
def summarize(
    row: dict, warmup: int, flops: float, limit: float | None, nproc: int, gpu: str | None, batch: int
) -> dict:
    if "error" in row:
        return row
    steady = row["step_s"][warmup:] or row["step_s"]
    step = statistics.median(steady)
    sps = batch * nproc / step
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


def print_table(rows: list[dict], limits: dict, flops: dict, shape: str, batch: int, nproc: int) -> None:
    m, k, n = SHAPES[shape].gemm(batch)
    print(f"\nshape {shape}: {SHAPES[shape].about}; {batch} per rank × {nproc} ranks")
    print(
        "FLOPs per sample (fwd+bwd): "
        + ", ".join(f"{name} {v / 1e9:.3f} GFLOP" for name, v in flops.items())
        + f";  matrix-product limit per process ({m} × {k} @ {k} × {n}): "
        + ", ".join(f"{dtype} {v:.1f} GFLOP/s" for dtype, v in limits.items())
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


def shape_overrides(shape: str, batch: int | None = None) -> list[str]:
    """mm-ptft's dotted overrides of configs/pretrain-fmnist.yaml for ``shape`` at ``batch`` samples per rank."""
    return [*SHAPES[shape].overrides, f"data.batch_size={batch or SHAPES[shape].batch}"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="fm-vit-t", choices=sorted(SHAPES), help="architecture of both trainers")
    p.add_argument("--batch", type=int, default=None, help="samples per rank, both trainers (default: the shape's)")
    p.add_argument("--steps", type=int, default=40, help="steps per speed row")
    p.add_argument("--warmup", type=int, default=8, help="steps excluded from the median")
    p.add_argument("--stages", type=int, nargs="*", default=[0, 1, 2, 3])
    p.add_argument("--precisions", nargs="*", default=["bf16", "fp32"])
    p.add_argument("--variants", nargs="*", default=[], choices=sorted(VARIANTS), help="ablation rows (bf16 ZeRO-2)")
    p.add_argument("--open-clip", action="store_true", help="also time open_clip_train (amp_bf16, torchrun)")
    p.add_argument("--epoch", action="store_true", help="one-epoch quality runs: mm-ptft bf16 ZeRO-2 and open_clip")
    p.add_argument("--profile", action="store_true", help="profile one mm-ptft bf16 ZeRO-2 step after --warmup")
    p.add_argument("--data", default=str(ROOT / "data" / "fmnist"))
    p.add_argument("--out", default=None, help="JSON results (default bench/results/pretrain_throughput-<time>.json)")
    p.add_argument("--extra", nargs="*", default=[], help="dotted overrides for every mm-ptft row")
    args = p.parse_args(argv)

    shape = SHAPES[args.shape]
    batch = args.batch or shape.batch
    n_gpu, gpu = _cuda()
    nproc = n_gpu or 2
    device = "cuda" if n_gpu else "cpu"
    data = Path(args.data).resolve()
    if not (data / "dataset.json").is_file():
        sys.exit(f"error: {data} has no dataset.json; run `python -m data_tools fashion-mnist --out {data}`")
    work = Path(tempfile.mkdtemp(prefix="mm_ptft_bench_"))
    print(f"device: {gpu or 'cpu'} × {nproc} ranks; shape {args.shape}, {batch} per rank; work dir {work}", flush=True)

    limits = {dt: matmul_limit(dt, nproc, device, shape.gemm(batch)) for dt in ("bf16", "fp32")}
    overrides = [f"data.train={data}", f"eval.data={data}", *shape_overrides(args.shape, batch), *args.extra]
    flops = {"mm-ptft": flops_per_sample(overrides, shape.count_batch)}
    if args.open_clip or args.epoch:
        flops["open_clip"] = open_clip_flops_per_sample(shape.open_clip_model, shape.count_batch)
    raw = []
    for precision in args.precisions:
        for stage in args.stages:
            name = f"mm-ptft z{stage} {precision}"
            print(f"running {name} …", flush=True)
            row = run_mm_ptft(work, name.replace(" ", "_"), stage, precision, args.steps, nproc, overrides)
            row["name"], row["precision"] = name, precision
            raw.append(row)
    for variant in args.variants:
        name = f"mm-ptft z2 {variant}"
        print(f"running {name} …", flush=True)
        row = run_mm_ptft(work, name.replace(" ", "_"), 2, "bf16", args.steps, nproc, overrides + VARIANTS[variant])
        row["name"], row["precision"] = name, "bf16"
        raw.append(row)
    if args.open_clip:
        print("running open_clip_train amp_bf16 …", flush=True)
        raw.append(run_open_clip(work, "open_clip amp_bf16", args.steps, nproc, data, 60000, shape, batch))
    if args.epoch:
        print("one epoch: mm-ptft bf16 ZeRO-2 …", flush=True)
        row = run_mm_ptft(work, "epoch_mm-ptft", 2, "bf16", 0, nproc, overrides + ["eval.every=0"])
        row["name"], row["precision"] = "mm-ptft z2 bf16 epoch", "bf16"
        raw.append(row)
        print("one epoch: open_clip_train …", flush=True)
        raw.append(run_open_clip(work, "open_clip epoch", 0, nproc, data, 60000, shape, batch))
    profile = None
    if args.profile:
        print(f"profiling mm-ptft z2 bf16: step {args.warmup + 1}, rank 0 …", flush=True)
        profile = run_profile(work, args.warmup, nproc, overrides)

    rows = []
    for row in raw:
        precision = row.get("precision", "bf16")
        row_flops = flops["open_clip" if row["name"].startswith("open_clip") else "mm-ptft"]
        limit = limits["fp32" if precision == "fp32" else "bf16"]
        rows.append(summarize(row, args.warmup, row_flops, limit, nproc, gpu, batch))
    print_table(rows, limits, flops, args.shape, batch, nproc)
    if profile is not None:
        print_profile(profile)
    result = {
        "device": gpu or "cpu",
        "ranks": nproc,
        "shape": args.shape,
        "shape_about": shape.about,
        "batch_per_rank": batch,
        "flops_per_sample": flops,
        "matmul_shape": shape.gemm(batch),
        "matmul_limit_gflops": limits,
        "steps": args.steps,
        "warmup": args.warmup,
        "rows": rows,
        "profile": profile,
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
