"""Multi-process integration: ZeRO 0-3 under torchrun / the deepspeed launcher, consolidation, exact resume,
2 "nodes", bad data. Two grouped launches (see dist_scenarios.py) serve most tests."""

from __future__ import annotations

import json
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch
from helpers import BIN, free_port, launch_env, recorded_keys, split_attempts

from mm_ptft import checkpoint as ckpt
from mm_ptft.config import load_config
from mm_ptft.models import create_model

pytestmark = [pytest.mark.dist, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def _metrics(run_dir: Path, kind="train"):
    return [
        json.loads(line)
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["kind"] == kind
    ]


@pytest.mark.parametrize("run", ["zero1-bf16", "zero2-bf16", "zero3-bf16", "zero0-fp32", "zero3-fp32"])
def test_zero_stage_trains_and_consolidates_into_single_device_model(scenarios, run):
    run_dir = scenarios / run
    losses = [r["loss"] for r in _metrics(run_dir)]
    assert len(losses) == 6 and losses[-1] < losses[0], losses
    evals = _metrics(run_dir, "eval")
    assert [r["step"] for r in evals] == [3, 6] and all("zeroshot/acc1" in r for r in evals)
    cfg = load_config(run_dir / "config.yaml")
    model = create_model(cfg.model)
    ckpt.load_model_weights(model, ckpt.load_weights(run_dir / "model.safetensors"))  # strict, fp32
    state = ckpt.load_weights(run_dir / "model.safetensors")
    assert all(v.dtype == torch.float32 for v in state.values())
    meta = ckpt.read_meta(ckpt.resolve_resume(run_dir / "checkpoints", "latest"))
    assert meta["zero_stage"] == int(run[4]) and meta["world_size"] == 2


def test_zero3_and_zero0_reach_the_same_weights(scenarios):
    a = ckpt.load_weights(scenarios / "zero0-fp32" / "model.safetensors")
    b = ckpt.load_weights(scenarios / "zero3-fp32" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4, msg=k)


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_continues_exactly(scenarios, stage):
    ref, cut = scenarios / f"ref-zero{stage}", scenarios / f"cut-zero{stage}"
    assert "resumed from" in (scenarios / "phase2.log").read_text()
    for rank in (0, 1):
        ref_keys, cut_keys = recorded_keys(ref, rank), recorded_keys(cut, rank)
        # the interrupted run consumed steps 0-4 (killed after 5, last checkpoint at 4), then resumed at step 4;
        # under ZeRO-2 each step takes two micro-batches (cached accumulation)
        per_step = 2 if stage == 2 else 1
        before, after = split_attempts(cut_keys, per_step)
        first = [k for s, k in before if s < 4]
        resumed = [k for _, k in after]
        assert first + resumed == [k for _, k in ref_keys], f"rank {rank}"
        assert len(ref_keys) == 8 * per_step
    a = ckpt.load_weights(ref / "model.safetensors")
    b = ckpt.load_weights(cut / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)
    if stage == 2:  # train.ema_decay: model.safetensors is the weight average, carried through the resume
        latest = ckpt.resolve_resume(cut / "checkpoints", "latest")
        assert (latest / ckpt.EMA).is_file()
        raw = ckpt.consolidate(latest, ema=False)
        assert any(not torch.allclose(raw[k], b[k]) for k in b if b[k].is_floating_point())


def test_deepspeed_launch_on_cpu_leaves_no_shared_memory_behind(scenarios):
    """Under its launcher on CPU, DeepSpeed would build its shared-memory all-reduce op and map a 69 MB /dev/shm
    segment per rank that outlives the run (deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>); mm-ptft keeps
    the op off, so the phase-2 launch (deepspeed launcher, 2 ranks) must leave none for its port."""
    port = (scenarios / "phase2.port").read_text()
    log = (scenarios / "phase2.log").read_text()
    assert "resumed from" in log  # the launch ran its scenarios
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert "deepspeed_shm_comm" not in log  # not built (DeepSpeed prints the op's name when it loads it)


def test_corrupt_image_is_skipped_counted_and_run_completes(scenarios):
    run_dir = scenarios / "corrupt"
    train = _metrics(run_dir)
    summary = _metrics(run_dir, "summary")
    shards = len(list((scenarios / "bad-data" / "train").glob("*.tar")))
    # one epoch reads every shard; only the partial last batch may hold back a bad sample (one per shard of 100)
    assert summary and summary[0]["step"] == train[-1]["step"] > 0
    assert shards - 1 <= summary[0]["bad_samples"] <= shards
    assert train[-1]["bad_samples"] >= shards - 1
    assert "skipped (bad_image)" in (scenarios / "phase1.log").read_text()


def _shard_ofrecorded_keys(data: Path) -> dict[str, str]:
    out = {}
    for shard in sorted((data / "train").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for name in tar.getnames():
                out[name.split(".")[0]] = shard.name
    return out


def test_two_nodes_read_disjoint_shards(tmp_path, fmnist_tiny):
    """Two launcher processes (torchrun --nnodes 2, one rank each) on one machine: disjoint shards per node."""
    port = free_port()
    procs = []
    for node in (0, 1):
        cmd = [
            BIN / "torchrun",
            "--nnodes",
            "2",
            "--nproc-per-node",
            "1",
            "--node-rank",
            str(node),
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(port),
            "-m",
            "mm_ptft",
            "train",
            "-c",
            str(ROOT / "configs" / "pretrain-fmnist-tiny.yaml"),
            f"data.train={fmnist_tiny}",
            f"eval.data={fmnist_tiny}",
            f"train.output_dir={tmp_path}",
            "train.name=nodes",
            "train.progress=false",
            "train.record_keys=true",
            "train.steps=6",
            "data.batch_size=50",
            "train.report=false",
            "eval.max_samples=64",
        ]
        log = (tmp_path / f"node{node}.log").open("w")
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=launch_env(), stdout=log, stderr=subprocess.STDOUT))
    for node, p in enumerate(procs):
        assert p.wait(timeout=300) == 0, (tmp_path / f"node{node}.log").read_text()[-3000:]
    shard_of = _shard_ofrecorded_keys(fmnist_tiny)
    shards = [{shard_of[k] for _, keys in recorded_keys(tmp_path / "nodes", rank) for k in keys} for rank in (0, 1)]
    # 6 steps × 50 = 300 samples per node: half an epoch each, from shards no other node touched
    logs = "\n".join((tmp_path / f"node{n}.log").read_text()[-1500:] for n in (0, 1))
    assert shards[0] and shards[1] and not shards[0] & shards[1], f"shards per node: {shards}\n{logs}"
