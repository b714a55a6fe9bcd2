"""The data stream: deterministic, disjoint across workers/ranks, exactly resumable, and tolerant of bad data."""

import itertools

import pytest
import torch
from helpers import corrupt_image, drop_caption, member_names, truncate

from mm_ptft.config import DataConfig
from mm_ptft.data import (
    Collator,
    DataError,
    DataPosition,
    EvalStream,
    SampleDecoder,
    TrainStream,
    create_transform,
    make_loader,
    resolve_shards,
)
from mm_ptft.data.stream import StreamSpec, group_shards, shard_at, worker_stream


def _transform(train=True):
    from mm_ptft.config import ImageTransformConfig

    return create_transform(ImageTransformConfig(), 28, 1, [0.5], [0.5], train)


def _tokenize(texts):
    return {"input_ids": torch.tensor([[len(t)] for t in texts]), "attention_mask": torch.ones(len(texts), 1)}


def _decoder(train=True):
    return SampleDecoder(_transform(train), ["png", "jpg"])


def _train_batches(shards, position, workers=0, batch_size=32, seed=0, rank=0, **data):
    cfg = DataConfig(batch_size=batch_size, workers=workers, shuffle_group=2, **data)
    stream = TrainStream(shards, cfg, _decoder(), Collator(_tokenize), seed, rank, position)
    return make_loader(stream, workers, 2)


def test_shard_stream_epochs_are_permutations_split_across_workers():
    urls = tuple(f"s{i}.tar" for i in range(12))
    spec = StreamSpec(urls, seed=3, n_workers=4, group_size=1)
    for epoch in range(3):
        assert sorted(shard_at(spec, epoch * 12 + k) for k in range(12)) == sorted(urls)
    first_epoch = [group_shards(spec, w, g) for w in range(4) for g in range(3)]
    assert sorted(itertools.chain(*first_epoch)) == sorted(urls)  # each shard read by exactly one worker
    spec3 = StreamSpec(urls, seed=3, n_workers=4, group_size=2)  # 3 shards each per epoch: groups of 2 and 1
    assert [len(group_shards(spec3, 0, g)) for g in range(4)] == [2, 1, 2, 1]
    epoch0 = [group_shards(spec3, w, g) for w in range(4) for g in range(2)]
    assert sorted(itertools.chain(*epoch0)) == sorted(urls)
    assert shard_at(spec, 0) != shard_at(StreamSpec(urls, seed=4, n_workers=4), 0) or shard_at(spec, 1) != shard_at(
        StreamSpec(urls, seed=4, n_workers=4), 1
    )


def test_fewer_shards_than_workers_never_starves():
    spec = StreamSpec(("only.tar",), seed=0, n_workers=3, group_size=2)
    # each epoch hands its one shard to the next worker in turn; groups never straddle epochs
    assert [group_shards(spec, w, g) for w in range(3) for g in range(2)] == [["only.tar"]] * 6


def test_missing_shards_are_named(fmnist_tiny):
    with pytest.raises(DataError, match=r"1 of 7 shards .* do not exist, first: .*shard-000006.tar"):
        resolve_shards(str(fmnist_tiny / "train" / "shard-{000000..000006}.tar"))
    with pytest.raises(DataError, match="split 'val' not in"):
        resolve_shards(str(fmnist_tiny), "val")
    shards = resolve_shards(str(fmnist_tiny), "train")
    assert len(shards.urls) == 6 and shards.num_samples == 600 and len(shards.meta["classnames"]) == 10


def test_worker_stream_resumes_at_any_position(fmnist_tiny):
    shards = resolve_shards(str(fmnist_tiny))
    spec = StreamSpec(tuple(shards.urls), seed=1, n_workers=2, group_size=2)
    errors = []
    full = list(itertools.islice(worker_stream(spec, 1, (0, 0), errors.append), 700))  # > one epoch of this worker
    for cut in (0, 1, 199, 200, 350):
        position = full[cut - 1][1] if cut else (0, 0)
        resumed = list(itertools.islice(worker_stream(spec, 1, position, errors.append), 100))
        assert [s["__key__"] for s, _ in resumed] == [s["__key__"] for s, _ in full[cut : cut + 100]]
    assert not errors


@pytest.mark.parametrize("workers", [0, 2])
def test_train_loader_resume_yields_the_same_batches(fmnist_tiny, workers):
    shards = resolve_shards(str(fmnist_tiny))
    position = DataPosition(world_size=1, num_workers=max(workers, 1))
    loader = iter(_train_batches(shards, position, workers))
    reference = [next(loader) for _ in range(12)]
    keys = [b["key"] for b in reference]
    # stop after 7 batches, keep only the position, rebuild everything
    stopped = DataPosition(world_size=1, num_workers=max(workers, 1))
    for b in reference[:7]:
        stopped.update(b["_state"])
    restored = DataPosition.from_state_dict(stopped.state_dict(), 1, max(workers, 1))
    resumed = iter(_train_batches(shards, restored, workers))
    again = [next(resumed) for _ in range(5)]
    assert [b["key"] for b in again] == keys[7:12]
    for a, b in zip(again, reference[7:12]):
        torch.testing.assert_close(a["image"], b["image"])  # augmentation seeded by stream position


def test_ranks_read_disjoint_samples_within_an_epoch(fmnist_tiny):
    shards = resolve_shards(str(fmnist_tiny))
    seen = []
    for rank in (0, 1):
        loader = iter(_train_batches(shards, DataPosition(2, 1), rank=rank, batch_size=50))
        seen.append({k for _ in range(6) for k in next(loader)["key"]})  # 300 samples = half an epoch each
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == 600


def test_resume_layout_mismatch_is_refused():
    state = DataPosition(2, 1, 5, {0: (1, 3)}).state_dict()
    with pytest.raises(DataError, match="2 ranks × 1 workers, this run has 1 × 1"):
        DataPosition.from_state_dict(state, 1, 1)


def test_bad_samples_are_skipped_and_counted(fmnist_copy):
    train = fmnist_copy / "train"
    names = member_names(train / "shard-000000.tar")
    keys = sorted({n.split(".")[0] for n in names})
    corrupt_image(train / "shard-000000.tar", keys[3])
    drop_caption(
        train / "shard-000001.tar", sorted({n.split(".")[0] for n in member_names(train / "shard-000001.tar")})[0]
    )
    truncate(train / "shard-000002.tar", 0.5)
    shards = resolve_shards(str(fmnist_copy))
    loader = iter(_train_batches(shards, DataPosition(1, 1), batch_size=50, shuffle=False))
    bad, got = {}, set()
    with pytest.warns(UserWarning, match="data: skipped"):
        for _ in range(10):  # 500 good samples: all damaged shards are read, none twice
            batch = next(loader)
            got |= set(batch["key"])
            for k, v in batch["_state"]["bad"].items():
                bad[k] = bad.get(k, 0) + v
    assert bad.get("bad_image") == 1 and bad.get("missing_caption") == 1 and bad.get("tar_error") == 1
    assert keys[3] not in got


def test_unreadable_everything_is_a_clear_error(tmp_path):
    for i in range(2):
        (tmp_path / f"s{i}.tar").write_bytes(b"not a tar at all")
    shards = resolve_shards(str(tmp_path / "s{0..1}.tar"))
    loader = iter(_train_batches(shards, DataPosition(1, 1)))
    with pytest.raises(DataError, match="no readable samples"), pytest.warns(UserWarning):
        next(loader)


@pytest.mark.parametrize("world,workers", [(2, 1), (2, 2), (1, 2)])
def test_eval_stream_covers_every_sample_once(fmnist_tiny, world, workers):
    shards = resolve_shards(str(fmnist_tiny), "test")
    keys = []
    for rank in range(world):
        stream = EvalStream(shards, _decoder(False), Collator(_tokenize), 64, rank, world, workers)
        for batch in make_loader(stream, workers, 2):
            keys += batch["key"]
    assert len(keys) == 600 and len(set(keys)) == 600


@pytest.mark.parametrize(
    ("meta", "label"),
    [({"label": 3}, 3), ({"label": "7"}, 7), ({"label": 2.0}, 2), ({"label": "animals"}, -1), ({"label": None}, -1),
     ({"label": float("nan")}, -1), ({"label": True}, -1), ({}, -1), ([1, 2], -1)],
)  # fmt: skip
def test_json_labels_that_are_not_class_indices_mean_no_label(meta, label):
    """img2dataset's --save_additional_columns writes whatever the URL list holds: a class name or an empty cell is
    no label (-1), not a bad sample; only json that does not parse is bad_json."""
    import io as _io
    import json as _json

    from PIL import Image

    from mm_ptft.data import BadSampleLog, decode_sample

    png = _io.BytesIO()
    Image.new("L", (8, 8), 128).save(png, "PNG")
    raw = {"__key__": "k", "__url__": "u", "png": png.getvalue(), "txt": b"a shirt", "json": _json.dumps(meta).encode()}
    log = BadSampleLog()
    out = decode_sample(raw, None, ["png"], "txt", 100, log)
    assert out is not None and out["label"] == label and not log.counts
    raw["json"] = b"{not json"
    assert decode_sample(raw, None, ["png"], "txt", 100, log) is None and log.counts == {"bad_json": 1}
