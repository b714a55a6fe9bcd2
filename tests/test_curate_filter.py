"""data_tools filter and dedup: the kept keys against a selection computed here from the parquet with plain
pyarrow / python, the copies against the source shards read with plain tarfile, near-duplicate search against a
brute-force numpy twin, and dedup's recall / false removals on injected copies measured with the tiny model."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import ROOT, load_script, one_line_error, tar_samples
from PIL import Image

from data_tools import dedup, main, verify_dataset
from data_tools.curate import CORRUPTED_PARQUET
from data_tools.dedup import build_index, search_pairs

REPORT_FILES = {"report.md", "filter.json", "score_hist.png", "grid_lowest_kept.png", "grid_highest_removed.png"}
DEDUP_FILES = {"report.md", "dedup.json", "nn_similarity_hist.png", "grid_duplicates.png"}


def _split(root: Path, split: str = "train") -> dict[str, tuple[str, dict[str, bytes]]]:
    """{key: (shard name, {ext: bytes})} of a split, read with plain tarfile."""
    out = {}
    for shard in sorted((root / split).glob("*.tar")):
        out.update({key: (shard.name, files) for key, files in tar_samples(shard).items()})
    return out


def _check_copy(src: Path, out: Path, expected: set[str]) -> None:
    """``out``'s train split holds exactly ``expected``, byte for byte in the source's shards; all else as before."""
    before, after = _split(src), _split(out)
    assert set(after) == expected
    for key, (shard, files) in after.items():
        assert (shard, files) == before[key]
    counts = {p.name: sum(s == p.name for s, _ in after.values()) for p in sorted((src / "train").glob("*.tar"))}
    assert json.loads((out / "train" / "sizes.json").read_text()) == counts
    meta, src_meta = (json.loads((d / "dataset.json").read_text()) for d in (out, src))
    assert meta["splits"]["train"]["num_samples"] == len(expected)
    assert meta["splits"]["test"] == src_meta["splits"]["test"] and meta["classnames"] == src_meta["classnames"]
    for path in sorted((src / "test").iterdir()):
        assert (out / "test" / path.name).read_bytes() == path.read_bytes()
    assert verify_dataset(out).ok


def _rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


@pytest.fixture(scope="module")
def tied_scores(noisy_tiny, tmp_path_factory) -> Path:
    """A table with many ties in ``score`` (two decimals) and a second column ``other``, in a shuffled row order."""
    rng = np.random.default_rng(0)
    ids = [(shard, key) for key, (shard, _) in _split(noisy_tiny).items()]
    rng.shuffle(ids)
    table = {
        "shard": [s for s, _ in ids],
        "key": [k for _, k in ids],
        "score": np.round(rng.uniform(0, 1, len(ids)), 1).tolist(),
        "other": np.round(rng.normal(0, 1, len(ids)), 2).tolist(),
        "bad_reason": [None] * len(ids),
    }
    path = tmp_path_factory.mktemp("tied") / "tied.parquet"
    pq.write_table(pa.table(table), path)
    return path


def _filter(src: Path, scores: Path, out: Path, *rule: str) -> int:
    return main(["filter", "--src", str(src), "--scores", str(scores), "--out", str(out), *rule, "--quiet"])


def _top(rows: list[dict], column: str, fraction: float) -> set[str]:
    ranked = sorted(rows, key=lambda r: (-r[column], r["key"]))
    return {r["key"] for r in ranked[: round(fraction * len(rows))]}


# ----------------------------------------------------------------------------------------------------- filter
def test_filter_min_score_copies_and_measures(noisy_tiny: Path, noisy_tiny_scores: Path, tmp_path: Path) -> None:
    rows = _rows(noisy_tiny_scores)
    threshold = float(np.median([r["score"] for r in rows]))
    expected = {r["key"] for r in rows if r["score"] >= threshold}
    assert _filter(noisy_tiny, noisy_tiny_scores, tmp_path / "out", "--min-score", str(threshold)) == 0
    _check_copy(noisy_tiny, tmp_path / "out", expected)
    report = tmp_path / "out" / "curation"
    assert {p.name for p in report.iterdir()} >= REPORT_FILES
    stats = json.loads((report / "filter.json").read_text())
    assert stats["splits"]["train"] == {"samples": 600, "kept": len(expected), "removed": 600 - len(expected),
                                        "unreadable": 0}  # fmt: skip
    assert sum(c["kept"] for c in stats["per_class"].values()) == len(expected)

    # the measurement against corrupted.parquet, counted here; the json flags and --corrupted give the same
    flags = {r["key"]: r["replaced"] for r in _rows(noisy_tiny / CORRUPTED_PARQUET)}
    replaced = {k for k, r in flags.items() if r}
    want = {
        "replaced": len(replaced),
        "replaced_removed": len(replaced - expected),
        "clean": len(flags) - len(replaced),
        "clean_kept": len(expected - replaced),
    }
    assert {k: stats["replaced"][k] for k in want} == want
    assert stats["replaced"]["replaced_removed_share"] == pytest.approx(want["replaced_removed"] / want["replaced"])
    assert stats["replaced"]["clean_kept_share"] == pytest.approx(want["clean_kept"] / want["clean"])
    report2 = tmp_path / "elsewhere"
    args = ["--min-score", str(threshold), "--corrupted", str(noisy_tiny / CORRUPTED_PARQUET), "--report", str(report2)]
    assert _filter(noisy_tiny, noisy_tiny_scores, tmp_path / "out2", *args) == 0
    assert json.loads((report2 / "filter.json").read_text())["replaced"] == stats["replaced"]
    assert "replaced pairs removed" in (report2 / "report.md").read_text()


def test_filter_top_fraction_breaks_ties_by_key_and_reads_column(
    noisy_tiny: Path, tied_scores: Path, tmp_path: Path
) -> None:
    rows = _rows(tied_scores)
    for column in ("score", "other"):
        out = tmp_path / column
        assert _filter(noisy_tiny, tied_scores, out, "--top-fraction", "0.25", "--column", column) == 0
        expected = _top(rows, column, 0.25)
        assert len(expected) == 150
        assert set(_split(out)) == expected
    assert verify_dataset(tmp_path / "other").ok


def test_filter_per_class(noisy_tiny: Path, tied_scores: Path, tmp_path: Path) -> None:
    rows = _rows(tied_scores)
    label = {key: json.loads(files["json"])["label"] for key, (_, files) in _split(noisy_tiny).items()}
    assert _filter(noisy_tiny, tied_scores, tmp_path / "out", "--top-fraction", "0.3", "--per", "class") == 0
    expected = set().union(
        *(_top([r for r in rows if label[r["key"]] == c], "score", 0.3) for c in set(label.values()))
    )
    _check_copy(noisy_tiny, tmp_path / "out", expected)
    per_class = json.loads((tmp_path / "out" / "curation" / "filter.json").read_text())["per_class"]
    classnames = json.loads((noisy_tiny / "dataset.json").read_text())["classnames"]
    for c, name in enumerate(classnames):
        n = sum(v == c for v in label.values())
        assert per_class[name]["kept"] == round(0.3 * n) and per_class[name]["removed"] == n - round(0.3 * n)


def test_filter_per_caption_cluster(noisy_tiny: Path, tied_scores: Path, pretrained: Path, tmp_path: Path) -> None:
    pytest.importorskip("faiss")
    args = ["--top-fraction", "0.5", "--per", "caption-cluster", "--clusters", "4", "--model", str(pretrained)]
    assert _filter(noisy_tiny, tied_scores, tmp_path / "out", *args) == 0
    stats = json.loads((tmp_path / "out" / "curation" / "filter.json").read_text())
    clusters = stats["per_cluster"]
    assert len(clusters) == 4 and sum(c["samples"] for c in clusters.values()) == 600
    assert all(c["kept"] == round(0.5 * c["samples"]) for c in clusters.values())
    assert stats["splits"]["train"]["kept"] == len(_split(tmp_path / "out"))
    assert _filter(noisy_tiny, tied_scores, tmp_path / "x", "--top-fraction", "0.5", "--per", "caption-cluster") == 2


def test_filter_removes_and_counts_unreadable(
    noisy_tiny: Path, noisy_tiny_scores: Path, tmp_path: Path, capsys
) -> None:
    rows = _rows(noisy_tiny_scores)
    for r in rows[10:15]:
        r["score"], r["bad_reason"] = None, "bad_image: test"
    rows[20]["score"] = float("nan")
    path = tmp_path / "s.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(noisy_tiny_scores)), path)
    assert _filter(noisy_tiny, path, tmp_path / "out", "--min-score", "-1") == 0
    assert "kept 594, removed 0, unreadable 6" in capsys.readouterr().out
    _check_copy(
        noisy_tiny, tmp_path / "out", {r["key"] for i, r in enumerate(rows) if i not in (10, 11, 12, 13, 14, 20)}
    )


def test_filter_errors_are_one_line(noisy_tiny: Path, noisy_tiny_scores: Path, tmp_path: Path, capsys) -> None:
    assert _filter(noisy_tiny, noisy_tiny_scores, tmp_path / "a", "--min-score", "0", "--column", "nope") == 2
    err = one_line_error(capsys)
    assert "'nope'" in err and "shard, key, score, bad_reason" in err
    rows = _rows(noisy_tiny_scores)
    for name, table in (("short", rows[:-3]), ("extra", [*rows, dict(rows[0], key="train-9999999")])):
        pq.write_table(pa.Table.from_pylist(table), tmp_path / f"{name}.parquet")
    assert _filter(noisy_tiny, tmp_path / "short.parquet", tmp_path / "b", "--top-fraction", "0.5") == 2
    assert "misses 3 samples of split train" in one_line_error(capsys)
    assert _filter(noisy_tiny, tmp_path / "extra.parquet", tmp_path / "c", "--top-fraction", "0.5") == 2
    assert "train-9999999" in one_line_error(capsys)
    assert _filter(noisy_tiny, noisy_tiny_scores, tmp_path / "d", "--top-fraction", "1.5") == 2
    assert "--top-fraction" in one_line_error(capsys)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ------------------------------------------------------------------------------------------------------ dedup
DEDUP_BENCH = load_script(ROOT / "bench" / "dedup_recall.py")
PER_KIND = 10


@pytest.fixture(scope="module")
def with_dups(fmnist_tiny, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """fmnist_tiny plus one shard of injected copies (bench/dedup_recall.py: ``dup-<kind>-NNNN``, 10 per kind of 70
    distinct originals, all after the originals in (shard, key) order); returns (dataset dir, {copy: original})."""
    root = tmp_path_factory.mktemp("dups") / "data"
    source = DEDUP_BENCH.inject_copies(fmnist_tiny, root, PER_KIND)
    assert len(source) == len(DEDUP_BENCH.KINDS) * PER_KIND == len(set(source.values()))
    assert verify_dataset(root).ok
    copies = _split(root)
    for key, original in source.items():  # the original's size but for resize-down; txt / json travel with it
        files = copies[key][1]
        image = Image.open(io.BytesIO(files.get("png") or files["jpg"]))
        assert image.size == ((26, 26) if "resize-down" in key else (28, 28)), key
        assert files["txt"] == copies[original][1]["txt"]
    return root, source


def _dedup(src: Path, out: Path, *extra: str) -> int:
    return main(["dedup", "--src", str(src), "--out", str(out), *extra, "--quiet"])


def test_dedup_exact_only_without_a_model(with_dups, tmp_path: Path, capsys) -> None:
    root, source = with_dups
    samples = _split(root)
    first: dict[str, str] = {}
    expected_removed = set()
    for key in sorted(samples, key=lambda k: (samples[k][0], k)):  # (shard, key) order: the first copy stays
        digest = hashlib.sha256(next(v for e, v in samples[key][1].items() if e in ("png", "jpg"))).hexdigest()
        if digest in first:
            expected_removed.add(key)
        first.setdefault(digest, key)
    assert {k for k in source if k.startswith("dup-exact")} <= expected_removed
    assert _dedup(root, tmp_path / "out") == 0
    assert "only exact duplicates" in capsys.readouterr().out
    _check_copy(root, tmp_path / "out", set(samples) - expected_removed)
    rows = _rows(tmp_path / "out" / "duplicates.parquet")
    assert {r["key"] for r in rows if not r["kept"]} == expected_removed
    assert all(r["kind"] == "exact" and r["similarity"] == 1.0 for r in rows if not r["kept"])
    kept = {r["group"]: r["key"] for r in rows if r["kept"]}
    assert all(kept[r["group"]] == source[r["key"]] for r in rows if r["key"].startswith("dup-"))
    assert {"report.md", "dedup.json", "grid_duplicates.png"} <= {p.name for p in (tmp_path / "out/curation").iterdir()}

    # --keep highest-score: a copy that scores higher than its original is the one kept
    ids = [(shard, key) for key, (shard, _) in samples.items()]
    scores = [1.0 if k.startswith("dup-exact") else 0.5 for _, k in ids]
    table = {"shard": [s for s, _ in ids], "key": [k for _, k in ids], "score": scores, "bad_reason": [None] * len(ids)}
    pq.write_table(pa.table(table), tmp_path / "s.parquet")
    assert _dedup(root, tmp_path / "best", "--keep", "highest-score", "--scores", str(tmp_path / "s.parquet")) == 0
    removed = {r["key"] for r in _rows(tmp_path / "best" / "duplicates.parquet") if not r["kept"]}
    exact_copies = {k for k in source if k.startswith("dup-exact")}
    assert {source[k] for k in exact_copies} <= removed and not exact_copies & removed


def _measure(root: Path, out: Path, source: dict[str, str]) -> dict:
    rows = _rows(out / "duplicates.parquet")
    removed = {r["key"] for r in rows if not r["kept"]}
    return {**DEDUP_BENCH.measure(removed, list(_split(root)), source), "rows": rows}


def test_dedup_near_duplicates_with_the_tiny_model(with_dups, pretrained: Path, tmp_path: Path) -> None:
    """The tiny model (20 steps on 600 images) embeds every Fashion-MNIST image almost alike: the originals'
    nearest-neighbour cosine is ~0.975-0.9994, so the default 0.95 merges nearly the whole split. The threshold
    here is taken from that measurement — just above the originals' largest nearest-neighbour similarity — and
    what it finds is printed (pytest -s); re-encoded copies (same or JPEG-close pixels) are found, resized and
    cropped ones are mostly not: this model cannot meet the issue's target, a trained one is measured on 60k."""
    pytest.importorskip("faiss")
    root, source = with_dups
    assert _dedup(root, tmp_path / "default", "--model", str(pretrained)) == 0
    default = _measure(root, tmp_path / "default", source)
    print(f"\nthreshold 0.95: near recall {default['near_recall']:.3f}, false {default['false_removals']:.3f}")

    # the originals alone: their nearest-neighbour similarities set the threshold
    clean = tmp_path / "clean"
    shutil.copytree(root, clean)
    (clean / "train" / "shard-000006.tar").unlink()
    meta = json.loads((clean / "dataset.json").read_text())
    meta["splits"]["train"] = {**meta["splits"]["train"], "pattern": "train/shard-{000000..000005}.tar",
                               "num_samples": 600, "num_shards": 6}  # fmt: skip
    (clean / "dataset.json").write_text(json.dumps(meta))
    sizes = json.loads((clean / "train" / "sizes.json").read_text())
    (clean / "train" / "sizes.json").write_text(json.dumps({k: v for k, v in sizes.items() if k != "shard-000006.tar"}))
    assert _dedup(clean, tmp_path / "probe", "--model", str(pretrained), "--threshold", "1.0") == 0
    quantiles = json.loads((tmp_path / "probe" / "curation" / "dedup.json").read_text())["nearest_similarity_quantiles"]
    threshold = round(quantiles["max"] + 0.25 * (1 - quantiles["max"]), 5)

    out = tmp_path / "measured"
    assert _dedup(root, out, "--model", str(pretrained), "--threshold", str(threshold)) == 0
    measured = _measure(root, out, source)
    print(
        f"threshold {threshold} (originals' largest nearest {quantiles['max']:.5f}): near recall "
        f"{measured['near_recall']:.3f}, false {measured['false_removals']:.3f}, found per kind {measured['found']}"
    )
    # the same pixels embed alike at any threshold below 1; JPEG q90 moves this model's cosine to ~0.9995, around
    # the threshold (9 of 10 found on this host)
    assert measured["found"]["exact"] == measured["found"]["png"] == 1.0 and measured["found"]["jpeg"] >= 0.5
    assert measured["false_removals"] < 0.01
    assert {p.name for p in (out / "curation").iterdir()} >= DEDUP_FILES
    assert verify_dataset(out).ok
    # a removed copy's recorded similarity is its cosine to the copy kept, at least the threshold for a direct pair
    for row in measured["rows"]:
        if row["key"].startswith("dup-") and not row["kept"]:
            assert row["kind"] == ("exact" if row["key"].startswith("dup-exact") else "near")
            assert row["similarity"] >= threshold - 1e-6 or row["kind"] == "exact"


def test_dedup_pixels_finds_resized_and_cropped_copies(with_dups, tmp_path: Path, capsys) -> None:
    """Without a model: the injected copies (re-encoded, resized, cropped) are found by the pixel descriptor at its
    default threshold — all but resize-down (13/14 of the size: its detail is gone, 1 of its 10 falls just below) —
    and no original of fmnist_tiny is removed; each removed copy's recorded similarity is the pair's similarity
    recomputed here from the two images."""
    pytest.importorskip("faiss")
    from data_tools import pixels

    root, source = with_dups
    out = tmp_path / "pixels"
    assert _dedup(root, out, "--pixels") == 0
    assert "only exact" not in capsys.readouterr().out
    measured = _measure(root, out, source)
    assert all(v == 1.0 for kind, v in measured["found"].items() if kind != "resize-down"), measured["found"]
    assert measured["found"]["resize-down"] >= 0.8 and measured["recall"] >= 0.95
    assert measured["originals_removed"] == 0
    assert verify_dataset(out).ok and {p.name for p in (out / "curation").iterdir()} >= DEDUP_FILES
    assert "pixel descriptor" in (out / "curation" / "report.md").read_text()
    samples = _split(root)
    decode = pixels.PixelDescriptor().decode
    kept = {r["group"]: r["key"] for r in measured["rows"] if r["kept"]}
    for row in measured["rows"]:
        if not row["kept"] and row["kind"] == "near":
            a, b = (decode(samples[k][1])[0] for k in (row["key"], kept[row["group"]]))
            assert row["similarity"] == pytest.approx(pixels.similarity(a, b), abs=1e-6)
            assert row["similarity"] >= pixels.THRESHOLD - 1e-6
    assert main(["dedup", "--src", str(root), "--out", str(tmp_path / "x"), "--pixels", "--model", "m"]) == 2
    assert "not both" in capsys.readouterr().err


def test_pixel_pairs_match_brute_force() -> None:
    """The transform-grid search against every pair scored both ways with numpy, on smooth random thumbnails with
    planted copies: exact ones, one zoomed by a crop-and-resize, and one inverted (not a duplicate)."""
    pytest.importorskip("faiss")
    import torch
    import torch.nn.functional as F

    from data_tools import pixels
    from data_tools.dedup import _pixel_pairs

    size = pixels.SIZE
    coarse = torch.from_numpy(np.random.default_rng(0).random((40, 1, 7, 7), dtype=np.float32))
    smooth = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    base = (smooth * 255).round().to(torch.uint8).view(40, -1).numpy()
    crop = F.interpolate(smooth[3:4, :, 1:-1, 1:-1], size=(size, size), mode="bilinear", align_corners=False)
    zoomed = (crop * 255).round().to(torch.uint8).view(1, -1).numpy()
    thumbs = np.concatenate([base, base[:3], zoomed, 255 - base[4:5]])  # rows 40-42 exact, 43 zoomed, 44 inverted
    threshold = 0.99
    i, j, sim, nearest = _pixel_pairs(thumbs, threshold, "flat", None, 8)
    views = [pixels.descriptors(thumbs, t) for t in pixels.transforms()]
    best = np.max([np.maximum(v @ views[0].T, (v @ views[0].T).T) for v in views], axis=0)
    np.fill_diagonal(best, -np.inf)
    bi, bj = np.nonzero(np.triu(best >= threshold, 1))
    found = sorted(zip(i.tolist(), j.tolist(), strict=True))
    assert found == sorted(zip(bi.tolist(), bj.tolist(), strict=True))
    assert {(0, 40), (1, 41), (2, 42), (3, 43)} <= set(found)
    assert not any(44 in pair for pair in found)
    np.testing.assert_allclose(sim, best[i, j], atol=1e-5)
    # nearest: the best any of a thumbnail's own views reaches against another's untransformed descriptor
    own = np.max([v @ views[0].T for v in views], axis=0)
    np.fill_diagonal(own, -np.inf)
    np.testing.assert_allclose(nearest, own.max(1), atol=1e-5)


# ---------------------------------------------------------------------------------------------- pair search
@pytest.mark.parametrize("blocks", ["one", "many"])
@pytest.mark.parametrize(("kind", "options"), [("flat", {}), ("ivf", {"nlist": 16, "nprobe": 16})])
def test_search_pairs_matches_brute_force(kind: str, options: dict, blocks: str, monkeypatch) -> None:
    pytest.importorskip("faiss")
    if blocks == "many":  # k-NN blocks of 64 queries; the 31 range-searched rows in chunks of 8
        monkeypatch.setattr(dedup, "_KNN_BATCH", 64)
        monkeypatch.setattr(dedup, "_RESULTS_PER_BATCH", 8 * 1500)
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(1500, 16)).astype(np.float32)
    vectors[100:130] = vectors[99]  # 31 identical rows: more neighbours above the threshold than k
    vectors[700] = vectors[600] + 0.05 * rng.normal(size=16)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    sims = vectors.astype(np.float64) @ vectors.T.astype(np.float64)
    upper = np.triu_indices(len(vectors), 1)
    above = sims[upper] >= 0.9
    expected = set(zip(upper[0][above].tolist(), upper[1][above].tolist(), strict=True))
    np.fill_diagonal(sims, -np.inf)

    i, j, similarity, nearest = search_pairs(build_index(vectors, kind, **options), vectors, 0.9)
    assert set(zip(i.tolist(), j.tolist(), strict=True)) == expected and len(i) == len(expected) > 465
    np.testing.assert_allclose(similarity, sims[i, j], atol=1e-5)
    np.testing.assert_allclose(nearest, sims.max(1), atol=1e-5)


def test_bench_dedup_index_finds_the_injected_pairs() -> None:
    pytest.importorskip("faiss")
    bench = load_script(ROOT / "bench" / "dedup_index.py")
    for index in ("flat", "ivf"):
        result = bench.simulate(4000, dim=64, pairs=50, threshold=0.95, index=index, threads=1)
        assert result["injected_above_threshold"] == 50 and result["found_injected"] == 50
        assert result["extra_pairs"] == 0 and result["peak_rss_mib"] > result["vectors_mib"] > 0
