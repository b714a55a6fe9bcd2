"""Tests for ``data_tools openclipart``: the writer on the real Debian package (with --limit), titles and captions of
known real files, labels, the stratified split, flattening onto white against a numpy reference, skipped files."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from data_tools import main, verify_dataset
from data_tools.captions import SkipLog
from data_tools.openclipart import (
    Clip,
    caption_for,
    encode_clip,
    filename_title,
    fix_mojibake,
    readable,
    scan_openclipart,
    split_clips,
)

SRC = Path("/usr/share/openclipart/png")
needs_openclipart = pytest.mark.skipif(
    not SRC.is_dir(), reason=f"{SRC} not found: the Debian package openclipart-png is not installed"
)
CLASSNAMES = [
    "animals", "buildings", "buttons", "computer", "containers", "decorations", "education", "electronics", "food",
    "geography", "logos", "office", "people", "plants", "recreation", "science", "shapes", "signs and symbols",
    "special", "tools", "transportation", "unsorted",
]  # fmt: skip

# Real files → the caption the writer must give them: the author and the file number gone, the title chunk used
# where it names the drawing, the generated star and card families readable, byte-identical copies merged.
KNOWN_CAPTIONS = {
    "animals/birds/cigno_architetto_frances_01.png": "clip art of cigno, animals, birds",
    "animals/dinosaurs/dino_architetto_francesc_05.png": "clip art of dino, animals, dinosaurs",
    "animals/armadillo_architetto_fra_01.png": "clip art of armadillo, animals",
    "animals/mammals/raccoon_ganson.png": "clip art of Raccoon Opening Box, animals, mammals",
    "animals/amphibian/2_dead_frogs_lumen_desig_01.png": "clip art of 2 dead frogs, animals, amphibian",
    "animals/lizard_guillaume_boitel_.png": "clip art of Lézard, animals",
    "tools/hammer_peterm1.png": "clip art of hammer, tools",
    "science/astronomy/saturn_dan_gerhards_01.png": "clip art of saturn, science, astronomy",
    "science/chemistry_flask_matthew__01.png": "clip art of Chemistry Flask, science",
    "food/beverages/kubek_herbaty_-_mug_of__01.png": "clip art of kubek herbaty - mug of tea, food, beverages",
    "unsorted/break_carlos_katastrofsk_.png": "clip art of break, unsorted",
    "office/telephone/telefono_email_frolland_01.png": "clip art of telefono, office, telephone",
    "shapes/stars/star_17pt07step.png": "clip art of 17-pointed star, shapes, stars",
    "recreation/games/cards/white/white_h_q.png": (
        "clip art of queen of hearts playing card, recreation, games, cards, white"
    ),
    "signs_and_symbols/flags/europe/france/france_centre_val_de_loire.png": (
        "clip art of France - Centre val de Loire, signs and symbols, flags, europe, france"
    ),
}
PROLIFIC_AUTHORS = ["architetto f", "rollandin", "buculei", "ganson", "benji", "juliane", "vasamaa", "gerald", "hevia"]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def real_scan() -> tuple[list[Clip], list[str], list[tuple[str, str]]]:
    """The whole installed corpus scanned once (hashes + PNG headers, no decoding): (clips, classnames, skipped)."""
    if not SRC.is_dir():
        pytest.skip(f"{SRC} not found: the Debian package openclipart-png is not installed")
    skips = SkipLog()
    clips, classnames = scan_openclipart(SRC, skips)
    return clips, classnames, skips.entries


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """120 real drawings written through the command line (shards of 40)."""
    if not SRC.is_dir():
        pytest.skip(f"{SRC} not found: the Debian package openclipart-png is not installed")
    out = tmp_path_factory.mktemp("openclipart") / "openclipart"
    assert main(["openclipart", "--out", str(out), "--limit", "120", "--shard-size", "40"]) == 0
    return out


def read_split(out: Path, split: str) -> list[dict[str, bytes]]:
    """Every sample of a split, read with plain tarfile: [{"__key__", ext: bytes}]."""
    samples: dict[str, dict] = {}
    pattern_dir = out / split
    for shard in sorted(pattern_dir.glob("shard-*.tar")):
        with tarfile.open(shard) as tf:
            for member in tf.getmembers():
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, {"__key__": key})[ext] = tf.extractfile(member).read()
    return list(samples.values())


def by_path(clips: list[Clip]) -> dict[str, Clip]:
    """Every copy's path → its drawing."""
    return {copy: clip for clip in clips for copy in clip.copies}


def composite_reference(path: Path) -> np.ndarray:
    """Independent flattening onto white: out = a * colour + (1 - a) * 255, in float, from the RGBA/LA decode."""
    with Image.open(path) as image:
        grey = image.mode in ("L", "LA")
        rgba = np.asarray(image.convert("LA" if grey else "RGBA"), dtype=np.float64)
    alpha = rgba[..., -1:] / 255.0
    out = rgba[..., :-1] * alpha + 255.0 * (1.0 - alpha)
    return out[..., 0] if grey else out


# ---------------------------------------------------------------- the writer on the real package


@needs_openclipart
def test_written_shards_verify_with_metadata(written: Path) -> None:
    report = verify_dataset(written)
    assert report.ok, report.bad[:5]
    meta = json.loads((written / "dataset.json").read_text())
    assert meta["name"] == "openclipart" and meta["classnames"] == CLASSNAMES
    assert meta["templates"] and all("{}" in t for t in meta["templates"])
    assert set(meta["splits"]) == {"train", "test"}
    assert sum(s["num_samples"] for s in meta["splits"].values()) == 120
    for split, entry in meta["splits"].items():
        sizes = json.loads((written / split / "sizes.json").read_text())
        assert sum(sizes.values()) == entry["num_samples"] == len(read_split(written, split))
        assert max(sizes.values()) <= 40


@needs_openclipart
def test_written_labels_match_folders_and_images_are_flat(written: Path) -> None:
    for split in ("train", "test"):
        for sample in read_split(written, split):
            meta = json.loads(sample["json"])
            top = meta["file"].split("/")[0]
            assert (SRC / meta["file"]).is_file() and meta["file"] in meta["copies"]
            assert meta["label"] == CLASSNAMES.index(readable(top)) and meta["class_name"] == readable(top)
            assert sample["__key__"] == f"{split}-{meta['index']:07d}" and meta["split"] == split
            caption = sample["txt"].decode()
            assert caption.startswith("clip art of ") and readable(top) in caption
            with Image.open(io.BytesIO(sample["jpg"])) as image:
                assert image.format == "JPEG" and image.mode in ("RGB", "L")
                assert max(image.size) <= 256
                w, h = meta["original_size"]
                if max(w, h) > 256:  # shrunk with the aspect kept (to the rounding of one pixel)
                    assert abs(image.size[0] / image.size[1] - w / h) < 2 / min(image.size)


@needs_openclipart
def test_limited_split_is_part_of_the_full_split(written: Path, real_scan) -> None:
    clips, _, _ = real_scan
    full = split_clips(clips, 0.1, 0)
    for split in ("train", "test"):
        indices = {json.loads(s["json"])["index"] for s in read_split(written, split)}
        assert indices <= {c.index for c in full[split]}


# ---------------------------------------------------------------- titles, captions, labels on the real corpus


@needs_openclipart
def test_known_captions_are_clean(real_scan) -> None:
    clips, _, _ = real_scan
    found = by_path(clips)
    for path, caption in KNOWN_CAPTIONS.items():
        clip = found[path]
        assert caption_for(clip.title, clip.categories) == caption, path


@needs_openclipart
def test_no_title_carries_an_author_or_a_file_number(real_scan) -> None:
    clips, _, _ = real_scan
    for clip in clips:
        title = clip.title.lower()
        assert "_" not in title and not title.endswith(".png"), clip.path
        assert not any(author in title for author in PROLIFIC_AUTHORS), (clip.path, clip.title)


@needs_openclipart
def test_copies_merge_and_labels_follow_the_top_folder(real_scan) -> None:
    clips, classnames, skipped = real_scan
    assert classnames == CLASSNAMES
    assert 6800 < len(clips) < 7000  # 8,121 files, ~1,200 byte-identical copies, 18 too large
    assert len({c.index for c in clips}) == len(clips)
    found = by_path(clips)
    # A drawing in two top folders is one sample: the majority folder, ties to the smaller class.
    assert found["animals/birds/eagle_01.png"] is found["signs_and_symbols/eagle_01.png"]
    assert found["animals/birds/eagle_01.png"].categories == ("animals", "birds")
    frogs = found["signs_and_symbols/hazard/2_dead_frogs_lumen_desig_01.png"]
    assert frogs.categories == ("animals", "amphibian") and len(frogs.copies) == 3
    for clip in clips:
        assert clip.label == CLASSNAMES.index(readable(clip.categories[0]))
        assert "/".join((*clip.categories, clip.path.name)) in clip.copies
        assert all(Path(SRC / c).read_bytes() == clip.path.read_bytes() for c in clip.copies[:2])
    too_large = [where for where, reason in skipped if reason.startswith("too large")]
    assert any("apple_mateya_01.png" in w for w in too_large) and len(skipped) == len(too_large)


@needs_openclipart
def test_split_is_disjoint_stratified_and_seeded(real_scan) -> None:
    clips, classnames, _ = real_scan
    split = split_clips(clips, 0.1, 0)
    train, test = ({c.index for c in split[s]} for s in ("train", "test"))
    assert not train & test and train | test == {c.index for c in clips}
    sizes, test_counts = Counter(c.label for c in clips), Counter(c.label for c in split["test"])
    for label, n in sizes.items():
        expected = min(max(round(n * 0.1), 1), n - 1) if n >= 2 else 0
        assert test_counts[label] == expected, classnames[label]
    assert {c.index for c in split_clips(clips, 0.1, 0)["test"]} == test
    assert {c.index for c in split_clips(clips, 0.1, 1)["test"]} != test


# ---------------------------------------------------------------- images: flattened onto white


@needs_openclipart
@pytest.mark.parametrize(
    ("path", "mode_in", "mode_out"),
    [
        ("animals/birds/cigno_architetto_frances_01.png", "RGBA", "RGB"),
        ("shapes/stars/star_17pt07step.png", "P", "RGB"),  # palette with a transparent colour
        ("animals/armadillo_architetto_fra_01.png", "LA", "L"),  # grey + alpha stays grey
    ],
)
def test_transparent_images_become_opaque_on_white(path: str, mode_in: str, mode_out: str) -> None:
    source = SRC / path
    with Image.open(source) as image:
        assert image.mode == mode_in and image.convert("RGBA").getpixel((0, 0))[3] == 0  # a transparent corner
    data, mode = encode_clip(source, 100_000, "png", 90)  # lossless and full size: comparable pixel by pixel
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode == mode == mode_out
        pixels = np.asarray(image, dtype=np.float64)
    assert pixels[0, 0].min() == 255  # the transparent corner is white, not black
    assert np.abs(pixels - composite_reference(source)).max() <= 1.0
    jpeg, _ = encode_clip(source, 64, "jpg", 90)
    with Image.open(io.BytesIO(jpeg)) as image:
        assert max(image.size) == 64 and min(np.asarray(image.convert("L"))[0, :4]) >= 250


# ---------------------------------------------------------------- a fake tree: bad files, options


def _png(path: Path, image: Image.Image, title: str | None = None, author: str | None = None) -> bytes:
    info = PngImagePlugin.PngInfo()
    for key, value in (("Title", title), ("Author", author)):
        if value:
            info.add_text(key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", pnginfo=info)
    return path.read_bytes()


def fake_tree(root: Path) -> Path:
    """Two categories of tiny PNGs plus a truncated PNG, a non-PNG and a loose file outside any category."""
    half = Image.new("RGBA", (40, 20), (200, 0, 0, 255))
    half.paste((0, 0, 0, 0), (0, 0, 20, 20))  # left half fully transparent
    _png(root / "cat_a" / "good_one_test_author_01.png", half, "Good One", "Test Author")
    _png(root / "cat_a" / "sub" / "good_two_test_author_02.png", Image.new("RGB", (30, 60), (0, 90, 0)))
    _png(root / "cat_b" / "grey_square.png", Image.new("L", (50, 50), 77), "grey_square", "Someone Else")
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    data = _png(root / "cat_b" / "truncated.png", noise)
    (root / "cat_b" / "truncated.png").write_bytes(data[: len(data) // 2])  # header fine, pixel data cut off
    (root / "cat_b" / "garbage.png").write_bytes(b"not a png at all" * 10)
    _png(root / "loose.png", Image.new("RGB", (8, 8)))
    return root


def test_bad_files_are_skipped_counted_and_warned(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, out = fake_tree(tmp_path / "png"), tmp_path / "out"
    args = ["openclipart", "--src", str(src), "--out", str(out), "--holdout", "0.5", "--format", "png"]
    assert main([*args, "--max-size", "16"]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning: skipped")]
    assert len(warnings) == 3
    assert any("truncated.png: cannot decode" in w for w in warnings)
    assert any("garbage.png: cannot decode" in w for w in warnings)
    assert any("loose.png: not in a category folder" in w for w in warnings)
    assert "warning: 3 files skipped in total" in err
    assert verify_dataset(out).ok
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["classnames"] == ["cat a", "cat b"]
    samples = read_split(out, "train") + read_split(out, "test")
    by_title = {json.loads(s["json"])["title"]: s for s in samples}
    assert set(by_title) == {"Good One", "good two", "grey square"}
    assert by_title["good two"]["txt"].decode() == "clip art of good two, cat a, sub"
    with Image.open(io.BytesIO(by_title["Good One"]["png"])) as image:  # 40x20 → 16x8, left half white
        assert image.format == "PNG" and image.mode == "RGB" and image.size == (16, 8)
        assert image.getpixel((1, 4)) == (255, 255, 255) and image.getpixel((14, 4))[0] > 150
    with Image.open(io.BytesIO(by_title["grey square"]["png"])) as image:
        assert image.mode == "L" and image.size == (16, 16)


def test_missing_source_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["openclipart", "--src", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "openclipart-png" in err[0]


# ---------------------------------------------------------------- title rules on names alone


@pytest.mark.parametrize(
    ("stem", "author", "authors", "title"),
    [
        ("cigno_architetto_frances_01", "Architetto Francesco Rollandin", (), "cigno"),  # author cut at 24 chars
        ("people_juliane_krug_07b", "Juliane Krug", (), "people"),  # number with a letter
        ("server_zazou", "zazou (shockwavedj@yahoo.es)", (), "server"),  # the author's first word only
        ("hammer_peterm1", None, ("peterm",), "hammer"),  # another file's author, number glued on
        ("raccoon_ganson", None, (), "raccoon"),  # a known alias (Gerald G.'s user name)
        ("steak-v0.1", None, (), "steak"),
        ("arrow01_4", None, (), "arrow"),
        ("mirjam_meijer_mirjam_mei_01", "Mirjam Meijer", (), ""),  # nothing but the author: the folder names it
        ("white_s_10", "Nicu Buculei", (), "10 of spades playing card"),
        ("star_5pt02step", None, (), "5-pointed star"),
    ],
)
def test_filename_title(stem: str, author: str | None, authors: tuple[str, ...], title: str) -> None:
    assert filename_title(stem, author, frozenset(authors)) == title


def test_caption_and_mojibake() -> None:
    assert caption_for("", ("people", "stickmen")) == "clip art of stickmen, people"
    assert caption_for("people", ("people",)) == "clip art of people"
    assert fix_mojibake("MoisÃ©s") == "Moisés" and fix_mojibake("Mikol\xe1\x9a") == "Mikoláš"
    assert fix_mojibake("café") == "café"
    assert split_clips([], 0.1, 0) == {"train": [], "test": []}


def test_mixture_recipe_tiny_twin_trains_and_evaluates_both(written: Path, fmnist_tiny: Path, tmp_path: Path) -> None:
    """configs/pretrain-mix-tiny.yaml on the tiny Fashion-MNIST shards + 120 real drawings: both sources are drawn
    (counted per source), and zero-shot is reported on each held-out set with its own classes."""
    import json

    from mm_ptft.cli import main as mm_main

    recipe = Path(__file__).resolve().parents[1] / "configs" / "pretrain-mix-tiny.yaml"
    overrides = [
        f"data.train=[{{path: {fmnist_tiny}, weight: 0.7, name: fmnist}}, "
        f"{{path: {written}, weight: 0.3, name: openclipart}}]",
        f"eval.data={fmnist_tiny}",
        f"eval.also=[{{data: {written}, name: openclipart}}]",
        f"train.output_dir={tmp_path}", "train.name=mix", "train.progress=false", "deepspeed.precision=fp32",
    ]  # fmt: skip
    assert mm_main(["train", "-c", str(recipe), *overrides]) == 0
    rows = [json.loads(line) for line in (tmp_path / "mix" / "metrics.jsonl").read_text().splitlines()]
    summary = rows[-1]
    assert summary["data/fmnist/samples"] + summary["data/openclipart/samples"] == 6 * 16
    assert summary["data/openclipart/samples"] > 0 and summary["data/fmnist/samples"] > 0
    held_out = json.loads((written / "dataset.json").read_text())["splits"]["test"]["num_samples"]
    assert summary["openclipart/zeroshot/n"] == held_out and summary["zeroshot/n"] == 256  # eval.max_samples 256
    assert "## Data sources" in (tmp_path / "mix" / "report.md").read_text()
