"""Weighted mixtures of training sources (mm_ptft/data/mix.py): proportions within sampling error, each source read
as its own epoch stream, exact resume (stream, loader and a real training run: keys and weights against an
uninterrupted run, in epoch and resampled modes), per-source counts in metrics and the report, one-line errors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from helpers import PRE_TINY, records, recorded_keys, summary_of, tiny_overrides

from mm_ptft import checkpoint as ckpt
from mm_ptft.config import ConfigError, load_config
from mm_ptft.data import DataError, DataPosition, resolve_shards
from mm_ptft.data.mix import Source, mixture_specs, mixture_stream, resolve_sources, start_position
from mm_ptft.data.stream import StreamSpec


def _mixture(data, weights=(3, 1), split_b="test") -> str:
    """``data.train`` of two real sources: the train split (keys ``train-…``) and another (``test-…``)."""
    return (
        f"data.train=[{{path: {data}, weight: {weights[0]}, name: a}}, "
        f"{{path: {data}, split: {split_b}, weight: {weights[1]}, name: b}}]"
    )


def _sources(data, weights=(3.0, 1.0)) -> list[Source]:
    return [
        Source("a", resolve_shards(str(data), "train"), weights[0]),
        Source("b", resolve_shards(str(data), "test"), weights[1]),
    ]


def _draws(sources, n, resampled=False, worker=0, n_workers=1, start=None, errors=None):
    base = StreamSpec(("unused",), seed=7, n_workers=n_workers, group_size=2, resampled=resampled)
    specs = mixture_specs(sources, base)
    logs = [(errors if errors is not None else []).append] * len(sources)
    stream = mixture_stream(specs, [s.weight for s in sources], worker, start or start_position(2), logs, seed=7)
    return list(itertools.islice(stream, n))


@pytest.mark.parametrize("resampled", [False, True], ids=["epoch", "resampled"])
def test_mixture_draws_each_source_in_proportion(fmnist_tiny, resampled):
    n, share = 4000, 0.25
    draws = _draws(_sources(fmnist_tiny), n, resampled)
    from_b = [s for s, i, _ in draws if i == 1]
    assert all(s["__key__"].startswith("test-") for s in from_b)  # the source index says where a sample came from
    assert all(s["__key__"].startswith("train-") for s, i, _ in draws if i == 0)
    sigma = math.sqrt(n * share * (1 - share))
    assert abs(len(from_b) - n * share) < 4 * sigma, len(from_b)
    keys_b = [s["__key__"] for s in from_b[:600]]
    if resampled:  # shards drawn with replacement: the first 600 draws of a 600-sample source repeat some
        assert len(set(keys_b)) < 600
    else:  # epoch mode: each source walks whole epochs of its own shards, every sample once before any repeats
        assert len(set(keys_b)) == 600
        keys_a = [s["__key__"] for s, i, _ in draws if i == 0][:1200]
        assert len(set(keys_a[:600])) == 600 and sorted(keys_a[:600]) == sorted(keys_a[600:1200])


def test_mixture_weights_are_normalised_and_seeded(fmnist_tiny):
    a = [i for _, i, _ in _draws(_sources(fmnist_tiny, (3.0, 1.0)), 500)]
    b = [i for _, i, _ in _draws(_sources(fmnist_tiny, (0.75, 0.25)), 500)]
    assert a == b  # only the proportions matter
    other_worker = [i for _, i, _ in _draws(_sources(fmnist_tiny), 500, worker=1, n_workers=2)]
    assert other_worker != a  # each logical worker has its own draws


def test_mixture_stream_resumes_at_any_position(fmnist_tiny):
    sources = _sources(fmnist_tiny, (1.0, 1.0))
    errors = []
    full = _draws(sources, 900, errors=errors)
    for cut in (0, 1, 99, 300, 601):
        position = full[cut - 1][2] if cut else start_position(2)
        resumed = _draws(sources, 150, start=position, errors=errors)
        assert [(s["__key__"], i) for s, i, _ in resumed] == [(s["__key__"], i) for s, i, _ in full[cut : cut + 150]]
    assert not errors


def test_one_source_position_is_unchanged_and_a_mixture_position_round_trips():
    one = DataPosition(world_size=1, num_workers=1)
    one.update({"worker": 0, "position": (3, 17)})
    assert one.state_dict()["positions"] == {"0": [3, 17]} and "sources" not in one.state_dict()
    assert DataPosition.from_state_dict(one.state_dict(), 1, 1).positions == {0: (3, 17)}
    mix = DataPosition(world_size=1, num_workers=1, sources=["a", "b"])
    mix.update({"worker": 0, "position": (40, ((2, 5), (1, 9)))})
    restored = DataPosition.from_state_dict(mix.state_dict(), 1, 1, ["a", "b"])
    assert restored.positions == {0: (40, ((2, 5), (1, 9)))}
    with pytest.raises(DataError, match=r"read \[a, b\], this run's data.train has \[b, a\]") as e:
        DataPosition.from_state_dict(mix.state_dict(), 1, 1, ["b", "a"])
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match=r"read \[one source\]"):
        DataPosition.from_state_dict(one.state_dict(), 1, 1, ["a", "b"])


def _run(data, out, name, mode, *extra):
    from mm_ptft.cli import main

    overrides = [*tiny_overrides(data, out, name), _mixture(data), f"data.resampled={mode == 'resampled'}",
                 "deepspeed.precision=fp32", "train.steps=8", "train.log_every=2", "train.record_keys=true",
                 "data.workers=2", "eval.max_samples=64", *extra]  # fmt: skip
    assert main(["train", "-c", str(PRE_TINY), *overrides]) == 0
    return out / name


@pytest.mark.parametrize("mode", ["epoch", "resampled"])
def test_mixture_run_resumes_exactly_and_reports_per_source_counts(fmnist_tiny, tmp_path, mode):
    """8 steps of the tiny recipe on a 3:1 mixture, uninterrupted vs stopped after 3 steps (a checkpoint at 3) and
    resumed in a new Trainer: the same sample keys at every step and the same final weights; the metrics count
    each source's raw samples, and the report shows them against the weights."""
    also = f"eval.also=[{{data: {fmnist_tiny}, split: train, name: b-train}}]"
    full = _run(fmnist_tiny, tmp_path, "full", mode, "train.save_every=0", also)
    _run(fmnist_tiny, tmp_path, "cut", mode, "train.save_every=3", "train.stop_after=3", "train.report=false")
    cut = _run(fmnist_tiny, tmp_path, "cut", mode, "train.resume=latest", "train.save_every=0")

    assert recorded_keys(cut, 0) == recorded_keys(full, 0)
    want = ckpt.load_weights(full / "model.safetensors")
    got = ckpt.load_weights(cut / "model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)

    keys = [k for _, batch in recorded_keys(full, 0) for k in batch]
    from_b = sum(k.startswith("test-") for k in keys)
    summary = summary_of(full)
    assert summary["data/a/samples"] + summary["data/b/samples"] == len(keys) == 8 * 16  # no bad samples here
    assert summary["data/b/samples"] == from_b and summary["data/a/bad"] == summary["data/b/bad"] == 0
    assert summary_of(cut)["data/b/samples"] == from_b  # counts continue across the resume
    assert abs(from_b - 32) < 4 * math.sqrt(128 * 0.25 * 0.75)
    last = records(full, "train")[-1]
    assert last["data/a/samples"] + last["data/b/samples"] == 128
    evaluated = records(full, "eval")[-1]  # eval.data and each eval.also dataset, under its own prefix
    assert {"zeroshot/acc1", "b-train/zeroshot/acc1"} <= evaluated.keys()
    assert evaluated["zeroshot/n"] == evaluated["b-train/zeroshot/n"] == 64
    report = (full / "report.md").read_text()
    assert "| a | 0.750 |" in report and "| b | 0.250 |" in report


def test_mixture_bad_samples_are_counted_per_source(fmnist_copy, tmp_path):
    from helpers import corrupt_image, member_names

    from mm_ptft.cli import main

    shard = sorted((fmnist_copy / "test").glob("*.tar"))[0]
    keys = sorted({name.split(".")[0] for name in member_names(shard)})[:3]
    for key in keys:
        corrupt_image(shard, key)
    overrides = [*tiny_overrides(fmnist_copy, tmp_path, "bad"), _mixture(fmnist_copy, (1, 1)), "train.steps=40",
                 "deepspeed.precision=fp32", "train.report=false", "eval.every=0", "eval.max_samples=16"]  # fmt: skip
    assert main(["train", "-c", str(PRE_TINY), *overrides]) == 0
    summary = summary_of(tmp_path / "bad")
    assert summary["data/a/bad"] == 0 and summary["data/b/bad"] == summary["bad_samples"] == 3


def test_mixture_config_errors_are_one_line(fmnist_tiny, tmp_path):
    base = tiny_overrides(fmnist_tiny, tmp_path)
    with pytest.raises(ConfigError, match="weight must be > 0") as e:
        load_config(PRE_TINY, [*base, _mixture(fmnist_tiny, (1, 0))])
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="empty list"):
        load_config(PRE_TINY, [*base, "data.train=[]"])
    cfg = load_config(PRE_TINY, [*base, f"data.train=[{{path: {fmnist_tiny}}}, {{path: {fmnist_tiny}, split: test}}]"])
    with pytest.raises(DataError, match="two sources are named 'fashion-mnist'; give each a distinct `name:`"):
        resolve_sources(cfg.data)
    cfg = load_config(PRE_TINY, [*base, f"data.train=[{{path: {fmnist_tiny}}}, {{path: {tmp_path / 'nowhere'}}}]"])
    with pytest.raises(DataError, match=r"data.train\[1\] \(.*nowhere\): ") as e:
        resolve_sources(cfg.data)
    assert "\n" not in str(e.value)


def test_eval_also_names_must_differ(fmnist_tiny, tmp_path):
    from mm_ptft.eval import plan_evals

    twice = f"eval.also=[{{data: {fmnist_tiny}, name: x}}, {{data: {fmnist_tiny}, split: train, name: x}}]"
    cfg = load_config(PRE_TINY, [*tiny_overrides(fmnist_tiny, tmp_path), twice])
    with pytest.raises(ConfigError, match=r"eval.also\[1\]: a second dataset named 'x'"):
        plan_evals(cfg)
    cfg = load_config(PRE_TINY, [*tiny_overrides(fmnist_tiny, tmp_path), f"eval.also=[{{data: {fmnist_tiny}}}]"])
    assert [prefix for prefix, _ in plan_evals(cfg)] == ["", "fashion-mnist/"]
