"""Tests for data_tools: Fashion-MNIST, folder and caption-file writers, and verify."""

from __future__ import annotations

import csv
import gzip
import io
import json
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from helpers import tar_samples
from PIL import Image

from data_tools import main, verify_dataset, write_caption_file
from data_tools.fashion_mnist import CLASSNAMES, encode_gray_png
from data_tools.shards import AtomicShardWriter, DataToolsError, Sample, fill_template
from data_tools.verify import SHARD_LEVEL, BadSample

FMNIST_SRC = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(
    not (FMNIST_SRC / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST idx files not in {FMNIST_SRC}: apt-get install -y dataset-fashion-mnist",
)


# ---------------------------------------------------------------- helpers


def parse_idx(path: Path, header: int) -> np.ndarray:
    """Independent idx parse: skip the header, the rest is uint8 data."""
    return np.frombuffer(gzip.decompress(path.read_bytes()), dtype=np.uint8, offset=header)


def rewrite_tar(path: Path, edit: Callable[[str, bytes], bytes | None]) -> None:
    """Rewrite a shard member by member through ``edit(name, data)``; returning None drops the member."""
    with tarfile.open(path) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for m, data in members:
            new = edit(m.name, data)
            if new is not None:
                m.size = len(new)
                tf.addfile(m, io.BytesIO(new))


def make_image(path: Path, fmt: str, color: int = 128) -> bytes:
    """Save a tiny RGB image in ``fmt`` and return its bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), (color, 255 - color, 7)).save(path, format=fmt)
    return path.read_bytes()


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """Return the single ``error: ...`` line printed to stderr."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: ")
    return err[0]


# ---------------------------------------------------------------- Fashion-MNIST


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Fashion-MNIST dataset (300 per split, 3 shards each), shared by the module; do not modify."""
    out = tmp_path_factory.mktemp("fmnist")
    assert main(["fashion-mnist", "--out", str(out), "--limit", "300", "--shard-size", "100"]) == 0
    return out


@needs_fmnist
def test_fmnist_pixels_labels_and_captions_match_idx(fmnist: Path) -> None:
    import webdataset as wds

    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = parse_idx(FMNIST_SRC / f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
        labels = parse_idx(FMNIST_SRC / f"{prefix}-labels-idx1-ubyte.gz", 8)
        pattern = json.loads((fmnist / "dataset.json").read_text())["splits"][split]["pattern"]
        samples = list(wds.WebDataset(str(fmnist / pattern), shardshuffle=False))
        assert len(samples) == 300
        indices = []
        for s in samples:
            meta = json.loads(s["json"])
            index = meta["index"]
            indices.append(index)
            assert s["__key__"] == f"{split}-{index:07d}"
            assert meta == {
                "label": int(labels[index]),
                "class_name": CLASSNAMES[labels[index]],
                "index": index,
                "source": "fashion-mnist",
                "split": split,
            }
            with Image.open(io.BytesIO(s["png"])) as im:
                assert im.format == "PNG" and im.mode == "L" and im.size == (28, 28)
                np.testing.assert_array_equal(np.asarray(im), images[index])
            assert CLASSNAMES[labels[index]] in s["txt"].decode("utf-8")
        assert len(set(indices)) == 300
        if split == "test":
            assert indices == list(range(300))
        else:  # shuffled: the first shard mixes classes
            assert indices != sorted(indices)
            first_shard_labels = {int(labels[i]) for i in indices[:100]}
            assert len(first_shard_labels) >= 8


@needs_fmnist
def test_fmnist_metadata_files(fmnist: Path) -> None:
    meta = json.loads((fmnist / "dataset.json").read_text())
    assert meta["name"] == "fashion-mnist"
    assert meta["classnames"] == CLASSNAMES
    assert 1 <= len(meta["templates"]) <= 6 and all("{}" in t for t in meta["templates"])
    for split in ("train", "test"):
        assert meta["splits"][split] == {
            "pattern": f"{split}/shard-{{000000..000002}}.tar",
            "num_samples": 300,
            "num_shards": 3,
        }
        sizes = json.loads((fmnist / split / "sizes.json").read_text())
        assert sizes == {f"shard-{i:06d}.tar": 100 for i in range(3)}
        for name, count in sizes.items():
            assert len(tar_samples(fmnist / split / name)) == count
        assert not list((fmnist / split).glob("*.tmp"))
    assert (fmnist / "classnames.txt").read_text().splitlines() == CLASSNAMES
    assert (fmnist / "templates.txt").read_text().splitlines() == meta["templates"]


@needs_fmnist
def test_fmnist_captions_are_grammatical_and_deterministic(fmnist: Path, tmp_path: Path) -> None:
    captions = [s["txt"].decode() for s in tar_samples(fmnist / "train" / "shard-000000.tar").values()]
    assert len(set(captions)) > 20  # several templates in use
    assert not any(" a ankle" in c for c in captions)
    again = tmp_path / "again"
    assert main(["fashion-mnist", "--out", str(again), "--limit", "100", "--shard-size", "100"]) == 0
    first = tar_samples(fmnist / "train" / "shard-000000.tar")
    second = tar_samples(again / "train" / "shard-000000.tar")
    assert list(first) == list(second)
    assert [s["txt"] for s in first.values()] == [s["txt"] for s in second.values()]


@needs_fmnist
def test_fmnist_refuses_to_overwrite_without_flag(fmnist: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fashion-mnist", "--out", str(fmnist), "--limit", "10"]) == 2
    assert "--overwrite" in error_line(capsys)


@needs_fmnist
def test_fmnist_overwrite_removes_stale_shards(tmp_path: Path) -> None:
    args = ["fashion-mnist", "--out", str(tmp_path), "--shard-size", "10"]
    assert main([*args, "--limit", "30"]) == 0
    assert main([*args, "--limit", "15", "--overwrite"]) == 0
    assert sorted(p.name for p in (tmp_path / "train").glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    assert verify_dataset(tmp_path).ok


def test_fmnist_missing_src(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope"
    assert main(["fashion-mnist", "--src", str(missing), "--out", str(tmp_path / "out")]) == 2
    line = error_line(capsys)
    assert str(missing) in line and "apt-get install -y dataset-fashion-mnist" in line
    assert not (tmp_path / "out").exists()


def test_fmnist_bad_idx_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte"):
        (src / f"{name}.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03" + b"\x00" * 12))
    (src / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"garbage!"))
    (src / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x00"))
    assert main(["fashion-mnist", "--src", str(src), "--out", str(tmp_path / "out")]) == 2
    line = error_line(capsys)
    assert "t10k-labels-idx1-ubyte.gz" in line and "magic" in line
    (src / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip")
    assert main(["fashion-mnist", "--src", str(src), "--out", str(tmp_path / "out")]) == 2
    assert "t10k-labels-idx1-ubyte.gz" in error_line(capsys)


def test_gray_png_is_lossless() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, size=(28, 28), dtype=np.uint8)
    with Image.open(io.BytesIO(encode_gray_png(pixels))) as im:
        assert im.mode == "L"
        np.testing.assert_array_equal(np.asarray(im), pixels)


def test_fill_template_articles() -> None:
    assert fill_template("a photo of a {}.", "ankle boot") == "a photo of an ankle boot."
    assert fill_template("a photo of a {}.", "bag") == "a photo of a bag."
    assert fill_template("A {} on black.", "apple") == "An apple on black."
    assert fill_template("a photo of the {}.", "apple") == "a photo of the apple."


def test_killed_writer_leaves_no_shard(tmp_path: Path) -> None:
    def write_then_fail() -> None:
        with AtomicShardWriter(tmp_path, "train", 10) as writer:
            writer.write(Sample(0, b"x", "png", "cap", {}))
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        write_then_fail()
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- folder / CSV / JSONL


@pytest.fixture
def image_folder(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """A class folder tree with three classes, a sidecar caption, an empty sidecar and an unsupported file."""
    src = tmp_path / "src"
    files = {
        "apple/a1.png": make_image(src / "apple/a1.png", "PNG", 10),
        "apple/a2.JPEG": make_image(src / "apple/a2.JPEG", "JPEG", 20),
        "hot_dog/h1.webp": make_image(src / "hot_dog/h1.webp", "WEBP", 30),
        "hot_dog/h2.jpg": make_image(src / "hot_dog/h2.jpg", "JPEG", 40),
        "cat/c1.png": make_image(src / "cat/c1.png", "PNG", 50),
        "cat/c2.png": make_image(src / "cat/c2.png", "PNG", 60),
    }
    (src / "cat/c1.txt").write_text("a sleepy tabby cat\n")
    (src / "cat/c2.txt").write_text("  \n")  # empty sidecar: skipped
    make_image(src / "cat/c3.gif", "GIF")  # unsupported: skipped
    return src, files


def read_split(out: Path, split: str) -> dict[str, dict[str, bytes]]:
    """Read all shards of a split into {key: {ext: bytes}}."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted((out / split).glob("shard-*.tar")):
        samples |= tar_samples(shard)
    return samples


def test_folder_writer(
    image_folder: tuple[Path, dict[str, bytes]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, files = image_folder
    out = tmp_path / "out"
    assert main(["folder", "--src", str(src), "--out", str(out), "--split", "val", "--shard-size", "2"]) == 0
    err = capsys.readouterr().err
    assert "c2.png: empty caption" in err and "c3.gif: unsupported file type .gif" in err
    assert "2 rows skipped" in err

    samples = read_split(out, "val")
    assert len(samples) == 5
    by_source = {Path(json.loads(s["json"])["source"]).relative_to(src).as_posix(): s for s in samples.values()}
    assert set(by_source) == set(files) - {"cat/c2.png"}
    ext = {"apple/a1.png": "png", "apple/a2.JPEG": "jpg", "hot_dog/h1.webp": "webp", "hot_dog/h2.jpg": "jpg"}
    for rel, e in ext.items():
        assert by_source[rel][e] == files[rel]  # bytes copied, not re-encoded
    meta = json.loads(by_source["hot_dog/h1.webp"]["json"])
    assert (meta["label"], meta["class_name"]) == (2, "hot dog")
    assert by_source["hot_dog/h1.webp"]["txt"] == b"a photo of a hot dog."
    assert by_source["apple/a1.png"]["txt"] == b"a photo of an apple."
    assert by_source["cat/c1.png"]["txt"] == b"a sleepy tabby cat"
    for key, s in samples.items():
        assert key == f"val-{json.loads(s['json'])['index']:07d}"

    meta = json.loads((out / "dataset.json").read_text())
    assert meta["name"] == "out" and meta["classnames"] == ["apple", "cat", "hot dog"]
    assert meta["templates"] == ["a photo of a {}."]
    assert meta["splits"]["val"] == {"pattern": "val/shard-{000000..000002}.tar", "num_samples": 5, "num_shards": 3}
    assert json.loads((out / "val/sizes.json").read_text()) == {
        "shard-000000.tar": 2,
        "shard-000001.tar": 2,
        "shard-000002.tar": 1,
    }
    assert main(["verify", str(out)]) == 0


def test_folder_second_split_merges_and_no_shuffle(image_folder: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:
    src, _ = image_folder
    out = tmp_path / "out"
    assert main(["folder", "--src", str(src), "--out", str(out), "--split", "train", "--no-shuffle"]) == 0
    assert main(["folder", "--src", str(src), "--out", str(out), "--split", "test", "--seed", "3"]) == 0
    meta = json.loads((out / "dataset.json").read_text())
    assert set(meta["splits"]) == {"train", "test"}
    assert list(read_split(out, "train")) == sorted(read_split(out, "train"))
    assert verify_dataset(out).num_samples == 10


def test_folder_missing_src(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["folder", "--src", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert str(tmp_path / "missing") in error_line(capsys)


def _caption_rows(tmp_path: Path) -> tuple[list[dict[str, str]], dict[str, bytes]]:
    files = {
        "img/one.png": make_image(tmp_path / "img/one.png", "PNG", 1),
        "img/two.jpg": make_image(tmp_path / "img/two.jpg", "JPEG", 2),
        "img/three.png": make_image(tmp_path / "img/three.png", "PNG", 3),
    }
    rows = [
        {"image": "img/one.png", "caption": "first caption, with a comma", "kind": "round"},
        {"image": "img/missing.png", "caption": "no file", "kind": "round"},
        {"image": "img/two.jpg", "caption": "héllo wörld", "kind": "square"},
        {"image": "img/three.png", "caption": "   ", "kind": "round"},
        {"image": str(tmp_path / "img/three.png"), "caption": "absolute path", "kind": "round"},
    ]
    return rows, files


def test_csv_writer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows, files = _caption_rows(tmp_path)
    csv_path = tmp_path / "pairs.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "caption", "kind"])
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "out"
    code = main(["captions", "--src", str(csv_path), "--out", str(out), "--class-col", "kind", "--shard-size", "2"])
    assert code == 0
    err = capsys.readouterr().err
    assert "row 2: missing image file" in err and "row 4: empty caption" in err and "2 rows skipped" in err

    samples = read_split(out, "train")
    assert sorted(samples) == ["train-0000000", "train-0000002", "train-0000004"]
    assert samples["train-0000000"]["png"] == files["img/one.png"]
    assert samples["train-0000002"]["jpg"] == files["img/two.jpg"]
    assert samples["train-0000002"]["txt"].decode("utf-8") == "héllo wörld"
    meta = json.loads(samples["train-0000002"]["json"])
    assert meta == {"source": str(tmp_path / "img/two.jpg"), "index": 2, "label": 1, "class_name": "square"}
    assert json.loads((out / "dataset.json").read_text())["classnames"] == ["round", "square"]
    assert verify_dataset(out).ok


def test_jsonl_writer_with_root_and_bad_lines(tmp_path: Path) -> None:
    rows, _ = _caption_rows(tmp_path)
    jsonl = tmp_path / "meta" / "pairs.jsonl"
    jsonl.parent.mkdir()
    lines = [json.dumps({"file": r["image"], "text": r["caption"]}) for r in rows]
    lines.insert(1, "{not json")
    lines.append('["a list"]')
    jsonl.write_text("\n".join(lines) + "\n\n")
    result = write_caption_file(jsonl, tmp_path / "out", "train", ("file", "text"), root=tmp_path)
    assert result.entry["num_samples"] == 3
    reasons = dict(result.skipped)
    assert reasons["line 2"].startswith("invalid JSON")
    assert reasons["line 3"].startswith("missing image file")
    assert reasons["line 5"] == "empty caption"
    assert reasons["line 7"] == "not a JSON object"
    assert len(result.skipped) == 4
    # Without --root, relative paths resolve against the file's own directory, where no image is.
    result = write_caption_file(jsonl, tmp_path / "out2", "train", ("file", "text"))
    assert result.entry["num_samples"] == 1  # only the absolute path
    assert reasons["line 2"].startswith("invalid JSON")
    assert str(jsonl.parent / "img/one.png") in dict(result.skipped)["line 1"]
    jsonl.write_text('{"image": "img/missing.png", "caption": "x"}\n')
    with pytest.raises(DataToolsError, match="no usable samples"):
        write_caption_file(jsonl, tmp_path / "out3", "train")
    assert not (tmp_path / "out3").exists()


def test_caption_warnings_are_capped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_image(tmp_path / "ok.png", "PNG")
    lines = ["image,caption", "ok.png,fine"] + [f"gone{i}.png,x" for i in range(25)]
    (tmp_path / "p.csv").write_text("\n".join(lines) + "\n")
    assert main(["captions", "--src", str(tmp_path / "p.csv"), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert sum(line.startswith("warning: skipped row") for line in err) == 20
    assert "warning: ... and 5 more skipped" in err and "warning: 25 rows skipped in total" in err


def test_csv_missing_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "p.csv").write_text("path,caption\nx.png,y\n")
    assert main(["captions", "--src", str(tmp_path / "p.csv"), "--out", str(tmp_path / "out")]) == 2
    assert "no column 'image'" in error_line(capsys)


# ---------------------------------------------------------------- verify


@needs_fmnist
def test_verify_clean(fmnist: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(fmnist), "--quiet"]) == 0
    assert "OK" in capsys.readouterr().out
    report = verify_dataset(fmnist)
    assert (report.num_shards, report.num_samples, report.bad) == (6, 600, [])
    assert main(["verify", str(fmnist / "train/shard-{000000..000002}.tar"), "--quiet"]) == 0
    assert main(["verify", str(fmnist), "--split", "test", "--quiet"]) == 0
    assert verify_dataset(fmnist / "test").num_samples == 300


@needs_fmnist
def test_verify_finds_corruption(fmnist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ds"
    shutil.copytree(fmnist, out)
    shards = [out / "train" / f"shard-{i:06d}.tar" for i in range(3)]

    # shard 0: one image replaced by garbage
    bad_image_key = list(tar_samples(shards[0]))[10]
    rewrite_tar(shards[0], lambda name, data: b"\x89PNG garbage" if name == f"{bad_image_key}.png" else data)
    # shard 2: one caption removed
    no_caption_key = list(tar_samples(shards[2]))[42]
    rewrite_tar(shards[2], lambda name, data: None if name == f"{no_caption_key}.txt" else data)
    # shard 1: cut in the middle of sample 50's image
    with tarfile.open(shards[1]) as tf:
        png = [m for m in tf.getmembers() if m.name.endswith(".png")][50]
    cut_key = png.name.split(".")[0]
    shards[1].write_bytes(shards[1].read_bytes()[: png.offset_data + 20])

    report = verify_dataset(out)
    sample_problems = {(b.shard, b.key): b.reason for b in report.bad if b.key != SHARD_LEVEL}
    assert set(sample_problems) == {
        (str(shards[0]), bad_image_key),
        (str(shards[1]), cut_key),
        (str(shards[2]), no_caption_key),
    }
    assert sample_problems[(str(shards[0]), bad_image_key)].startswith("bad image: png does not decode")
    assert sample_problems[(str(shards[1]), cut_key)] == "tar error: unexpected end of data"
    assert sample_problems[(str(shards[2]), no_caption_key)] == "missing caption"
    shard_problems = [b for b in report.bad if b.key == SHARD_LEVEL]
    assert shard_problems == [
        BadSample(str(shards[1]), SHARD_LEVEL, "count mismatch: sizes.json says 100, found 50"),
        BadSample(str(out / "dataset.json"), SHARD_LEVEL, "count mismatch: num_samples is 300, found 250"),
    ]
    assert report.num_bad_samples == 3 and report.num_samples == 550
    assert report.splits["test"].bad_samples == 0 and report.splits["train"].bad_samples == 3

    assert main(["verify", str(out), "--quiet"]) == 1
    stdout = capsys.readouterr().out
    assert f"{shards[2]} {no_caption_key} missing caption" in stdout
    assert "missing caption" in stdout.split("problems by reason:")[1]


@needs_fmnist
def test_verify_cut_between_samples_and_empty_caption(fmnist: Path, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    shutil.copytree(fmnist, out)
    shard = out / "test" / "shard-000001.tar"
    with tarfile.open(shard) as tf:
        first_of_sample_60 = [m for m in tf.getmembers() if m.name.endswith(".json")][60]
    shard.write_bytes(shard.read_bytes()[: first_of_sample_60.offset + 100])  # inside a header
    other = out / "test" / "shard-000002.tar"
    key = next(iter(tar_samples(other)))
    rewrite_tar(other, lambda name, data: b" \n" if name == f"{key}.txt" else data)

    report = verify_dataset(out, split="test")
    assert set(report.splits) == {"test"}
    assert BadSample(str(shard), SHARD_LEVEL, "tar error: cut off: no end-of-archive marker") in report.bad
    assert BadSample(str(shard), SHARD_LEVEL, "count mismatch: sizes.json says 100, found 60") in report.bad
    assert BadSample(str(other), key, "empty caption") in report.bad


def test_verify_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing"
    assert main(["verify", str(missing)]) == 2
    assert str(missing) in error_line(capsys)
    assert main(["verify", str(tmp_path)]) == 2
    assert "no shards found" in error_line(capsys)
