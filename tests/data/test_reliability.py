"""Reliability without process groups: data faults counted not raised (incl. a fuzz of the shard reader), config and
path faults as one-line errors before anything starts, safe loading of remote code. See docs/reliability.md."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from helpers import tiny_overrides
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mm_ptft.cli import main
from mm_ptft.config import ConfigError, load_config
from mm_ptft.data import BAD_REASONS, BadSampleLog, SampleDecoder, resolve_shards
from mm_ptft.data.stream import read_tar

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "pretrain-fmnist-tiny.yaml")


def _png(seed: int) -> bytes:
    from data_tools.fashion_mnist import encode_gray_png

    return encode_gray_png(np.random.default_rng(seed).integers(0, 255, (28, 28), dtype=np.uint8))


def _write_shard(path: Path, n: int = 10, caption=lambda i: f"a photo of item {i}.") -> Path:
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            for ext, data in (
                ("png", _png(i)),
                ("txt", caption(i).encode()),
                ("json", json.dumps({"label": i % 3}).encode()),
            ):
                info = tarfile.TarInfo(f"k{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _decode_all(url: str) -> tuple[list[dict], BadSampleLog, int]:
    from mm_ptft.config import ImageTransformConfig
    from mm_ptft.data import create_transform

    log = BadSampleLog(max_warnings=0)
    decode = SampleDecoder(
        create_transform(ImageTransformConfig(), 28, 1, [0.5], [0.5], False), ["png"], max_caption_chars=200
    )
    raw = list(read_tar(url, log))
    good = [d for d in (decode(r, log) for r in raw) if d is not None]
    return good, log, len(raw)


# -------------------------------------------------------------------------------------------------- data faults
def test_zero_byte_shard_oversized_caption_and_failing_url_are_counted(tmp_path):
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    good, log, _ = _decode_all(str(empty))
    assert not good and log.counts == {"tar_error": 1}

    big = _write_shard(tmp_path / "big.tar", 4, caption=lambda i: "x" * (500 if i == 2 else 10))
    good, log, _ = _decode_all(str(big))
    assert len(good) == 3 and log.counts == {"oversized_caption": 1}

    good, log, _ = _decode_all("pipe:cat /nonexistent/shard.tar")
    assert not good and sum(log.counts.values()) == 1 and set(log.counts) <= {"tar_error", "shard_open_error"}


def test_bad_sample_warning_names_shard_and_key(tmp_path):
    shard = _write_shard(tmp_path / "s.tar", 3, caption=lambda i: "" if i == 1 else "ok")
    with pytest.warns(UserWarning, match=r"skipped \(missing_caption\) in .*s\.tar: k0001"):
        log = BadSampleLog()
        decode = SampleDecoder(None, ["png"], need_image=False)
        [decode(r, log) for r in read_tar(str(shard), log)]


ORIGINAL: bytes | None = None


def _original(tmp_path_factory) -> bytes:
    global ORIGINAL
    if ORIGINAL is None:
        ORIGINAL = _write_shard(tmp_path_factory.mktemp("fuzz") / "s.tar", 10).read_bytes()
    return ORIGINAL


mutation = st.one_of(
    st.tuples(st.just("flip"), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8)),
    st.tuples(st.just("truncate"), st.floats(0.0, 1.0)),
    st.tuples(st.just("insert"), st.tuples(st.integers(0, 10**6), st.binary(min_size=1, max_size=64))),
    st.tuples(st.just("zero_block"), st.tuples(st.integers(0, 10**6), st.integers(1, 2048))),
)


def _mutate(data: bytes, m) -> bytes:
    kind, arg = m
    buf = bytearray(data)
    if kind == "flip":
        for pos, value in arg:
            buf[pos % len(buf)] = value
    elif kind == "truncate":
        buf = buf[: int(len(buf) * arg)]
    elif kind == "insert":
        pos, blob = arg
        buf[pos % len(buf) : pos % len(buf)] = blob
    else:
        pos, n = arg
        pos %= len(buf)
        buf[pos : pos + n] = bytes(min(n, len(buf) - pos))
    return bytes(buf)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(m=mutation)
def test_fuzzed_shards_never_crash_and_every_sample_is_accounted(tmp_path_factory, tmp_path, m):
    """≥ 500 mutated shards: the reader + decoder never raise; each raw sample is either used or counted bad."""
    path = tmp_path / "m.tar"
    path.write_bytes(_mutate(_original(tmp_path_factory), m))
    good, log, n_raw = _decode_all(str(path))
    per_sample_bad = sum(v for k, v in log.counts.items() if k not in ("tar_error", "shard_open_error"))
    assert len(good) + per_sample_bad == n_raw
    assert len(good) <= 10 and all(d["image"].shape == (1, 28, 28) for d in good)
    assert set(log.counts) <= set(BAD_REASONS)  # every skip is counted under a documented reason


def test_too_many_bad_samples_stop_the_run_with_a_clear_error(fmnist_copy, tmp_path, capsys):
    from helpers import corrupt_image, member_names

    train = fmnist_copy / "train"
    for shard in sorted(train.glob("*.tar")):  # every fifth image broken: 20 % > the 5 % allowed
        keys = sorted({n.split(".")[0] for n in member_names(shard)})
        for key in keys[::5]:
            corrupt_image(shard, key)
    code = main(
        [
            "train",
            "-c",
            TINY,
            *tiny_overrides(fmnist_copy, tmp_path),
            "train.steps=40",
            "train.log_every=32",
            "data.batch_size=16",
            "data.workers=0",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("error: data:") and "above data.max_bad_fraction=0.05" in err[-1]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stream_of_only_bad_samples_stops_instead_of_reading_forever(fmnist_copy, tmp_path, capsys, workers):
    """Every image broken: no batch can ever be made, so the trainer's per-batch check never runs; the stream itself
    stops in one line (in the training process and from a DataLoader worker)."""
    from helpers import corrupt_image, member_names

    for shard in sorted((fmnist_copy / "train").glob("*.tar")):
        for key in sorted({n.split(".")[0] for n in member_names(shard)}):
            corrupt_image(shard, key)
    code = main(["train", "-c", TINY, *tiny_overrides(fmnist_copy, tmp_path), "data.batch_size=16",
                 f"data.workers={workers}", "train.steps=4"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("error: data: ") and "no batch of 16 could be made" in err[-1], err[-1]
    assert "bad_image 2" in err[-1] and "data_tools verify" in err[-1]


# ------------------------------------------------------------------------------------------ config/path faults
def test_config_and_path_faults_are_one_line_errors(tmp_path, fmnist_tiny, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cases = [
        (["train.stpes=3"], "unknown key 'train.stpes'"),
        (["optim.lr=fast"], "optim.lr='fast' has the wrong type"),
        ([f"train.output_dir={blocker}/runs"], "train.output_dir"),
        ([f"eval.classnames={tmp_path}/nope.txt"], "eval.classnames file not found"),
        (["model.image.pretrained=/nonexistent/w.safetensors"], "model.image.pretrained file not found"),
        ([f"data.train={tmp_path}/missing"], "data: "),
    ]
    for overrides, expected in cases:
        code = main(["train", "-c", TINY, *tiny_overrides(fmnist_tiny, tmp_path), *overrides])
        err = capsys.readouterr().err.strip()
        assert code == 2, overrides
        assert "\n" not in err and err.startswith("error: ") and expected in err, (overrides, err)
    assert main(["train", "-c", str(tmp_path / "missing.yaml")]) == 2
    assert "config: file not found" in capsys.readouterr().err


def test_duplicate_class_names_and_labels_outside_the_list(tmp_path, fmnist_tiny, capsys):
    names = tmp_path / "classes.txt"
    names.write_text("shirt\ncoat\nshirt\n")
    code = main(["train", "-c", TINY, *tiny_overrides(fmnist_tiny, tmp_path), f"eval.classnames={names}"])
    assert code == 2 and "duplicate class name 'shirt'" in capsys.readouterr().err


def test_remote_code_is_not_run_unless_the_config_allows_it(tmp_path):
    """A local model whose config asks for custom code: refused by default, and the code never executes."""
    model_dir = tmp_path / "custom"
    model_dir.mkdir()
    marker = tmp_path / "executed"
    (model_dir / "config.json").write_text(
        json.dumps(
            {
                "model_type": "evil",
                "auto_map": {"AutoConfig": "configuration_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"},
            }
        )
    )
    payload = f"open({str(marker)!r}, 'w').write('x')\n"
    (model_dir / "configuration_evil.py").write_text(payload)
    (model_dir / "modeling_evil.py").write_text(payload)
    cfg = load_config(None, [f"model.text.pretrained={model_dir}", "model.text.tokenizer=minilm-l6"])
    assert cfg.model.text.trust_remote_code is False
    from mm_ptft.models import create_model

    with pytest.raises((ConfigError, ValueError)):
        create_model(cfg.model)
    assert not marker.exists()


def test_resolve_shards_with_urls_is_not_checked_locally():
    shards = resolve_shards("pipe:cat a.tar::pipe:cat b.tar")
    assert shards.urls == ["pipe:cat a.tar", "pipe:cat b.tar"] and shards.num_samples is None
