"""data_tools curation: ``corrupt-captions`` against the source shards read with plain tarfile, ``score`` against
the model's own embeddings, with bad samples, resume and ranks."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import torch
from helpers import corrupt_image, tar_samples

from data_tools import main, verify_dataset
from data_tools.curate import CORRUPTED_PARQUET, choose_replacements, score_dataset


def _split(root: Path, split: str = "train") -> dict[str, tuple[str, dict[str, bytes]]]:
    """{key: (shard name, {ext: bytes})} of a split, read with plain tarfile."""
    out = {}
    for shard in sorted((root / split).glob("*.tar")):
        out.update({key: (shard.name, files) for key, files in tar_samples(shard).items()})
    return out


def _corrupt(src: Path, out: Path, *extra: str) -> Path:
    assert main(["corrupt-captions", "--src", str(src), "--out", str(out), "--fraction", "0.3", *extra]) == 0
    return out


def test_corrupt_captions_replaces_and_records(fmnist_tiny: Path, noisy_tiny: Path) -> None:
    before, after = _split(fmnist_tiny), _split(noisy_tiny)
    table = pq.read_table(noisy_tiny / CORRUPTED_PARQUET).to_pylist()
    assert [r["key"] for r in table] == list(after) and set(after) == set(before)
    assert sum(r["replaced"] for r in table) == round(0.3 * len(before)) == 180
    for row in table:
        shard, files = after[row["key"]]
        src_shard, src_files = before[row["key"]]
        assert row["shard"] == shard == src_shard
        meta = json.loads(files["json"])
        assert meta.pop("caption_replaced") is row["replaced"]
        assert meta == json.loads(src_files["json"])  # label untouched
        assert files["png"] == src_files["png"]
        if row["replaced"]:
            assert files["txt"] != src_files["txt"]
            assert files["txt"] == before[row["source_key"]][1]["txt"]
            assert row["source_key"] != row["key"]
        else:
            assert files["txt"] == src_files["txt"] and row["source_key"] is None


def test_corrupt_captions_keeps_other_splits_and_verifies(fmnist_tiny: Path, noisy_tiny: Path) -> None:
    assert verify_dataset(noisy_tiny).ok
    for path in sorted((fmnist_tiny / "test").iterdir()):
        assert (noisy_tiny / "test" / path.name).read_bytes() == path.read_bytes()
    meta, src_meta = (json.loads((d / "dataset.json").read_text()) for d in (noisy_tiny, fmnist_tiny))
    assert meta["splits"] == src_meta["splits"] and meta["classnames"] == src_meta["classnames"]
    assert meta["name"] != src_meta["name"]
    assert (noisy_tiny / "train" / "sizes.json").read_text() == (fmnist_tiny / "train" / "sizes.json").read_text()


def test_corrupt_captions_is_deterministic(fmnist_tiny: Path, noisy_tiny: Path, tmp_path: Path) -> None:
    again = _corrupt(fmnist_tiny, tmp_path / "again", "--seed", "0")
    assert pq.read_table(again / CORRUPTED_PARQUET).equals(pq.read_table(noisy_tiny / CORRUPTED_PARQUET))
    assert _split(again) == _split(noisy_tiny)
    other = _corrupt(fmnist_tiny, tmp_path / "other", "--seed", "1")
    assert (
        pq.read_table(other / CORRUPTED_PARQUET)["replaced"]
        != pq.read_table(noisy_tiny / CORRUPTED_PARQUET)["replaced"]
    )


def test_choose_replacements_never_keeps_the_text() -> None:
    captions = [b"same"] * 9 + [b"other"]
    sources = choose_replacements(captions, 1.0, seed=3)
    assert len(sources) == 10 and all(captions[j] != captions[i] for i, j in sources.items())
    assert main(["corrupt-captions", "--src", "/nonexistent", "--out", "/tmp/x", "--fraction", "2"]) == 2


def test_score_matches_the_model(noisy_tiny: Path, noisy_tiny_scores: Path, pretrained: Path) -> None:
    from mm_ptft.data.stats import image_norm_stats
    from mm_ptft.models import Tokenize
    from mm_ptft.tasks import load_trained

    rows = pq.read_table(noisy_tiny_scores).to_pylist()
    samples = _split(noisy_tiny)
    assert [(r["shard"], r["key"]) for r in rows] == [(shard, key) for key, (shard, _) in samples.items()]
    assert all(r["bad_reason"] is None and r["score"] is not None for r in rows)
    # reference: the first 8 samples of shard 0 through the evaluation decoder, cosine computed here
    cfg, task = load_trained(pretrained)
    decoder = task.decoder(cfg, False, *image_norm_stats(cfg))
    keys = list(samples)[:8]
    batch = task.collator(Tokenize.create(cfg.model.text))(
        [decoder({"__key__": k, "__url__": "x", **samples[k][1]}, print) for k in keys]
    )
    with torch.no_grad():
        image = task.model.encode_image(batch["image"], normalize=False)
        text = task.model.encode_text(batch["input_ids"], batch["attention_mask"], normalize=False)
    expected = torch.nn.functional.cosine_similarity(image.double(), text.double(), dim=-1)
    got = torch.tensor([r["score"] for r in rows[:8]], dtype=torch.float64)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_replaced_pairs_score_lower(noisy_tiny: Path, noisy_tiny_scores: Path) -> None:
    scores = {r["key"]: r["score"] for r in pq.read_table(noisy_tiny_scores).to_pylist()}
    replaced = [scores[r["key"]] for r in pq.read_table(noisy_tiny / CORRUPTED_PARQUET).to_pylist() if r["replaced"]]
    clean = [scores[r["key"]] for r in pq.read_table(noisy_tiny / CORRUPTED_PARQUET).to_pylist() if not r["replaced"]]
    assert sum(replaced) / len(replaced) < sum(clean) / len(clean)


def test_score_margin_over_the_caption_bank(noisy_tiny: Path, pretrained: Path, tmp_path: Path) -> None:
    from mm_ptft.data.stats import image_norm_stats
    from mm_ptft.models import Tokenize
    from mm_ptft.tasks import load_trained

    out = tmp_path / "margin.parquet"
    assert score_dataset(pretrained, noisy_tiny, out, batch_size=64, progress=False, bank=12).combined
    rows = pq.read_table(out).to_pylist()
    samples = _split(noisy_tiny)
    # the bank: the first 12 distinct captions in shard order, read here with plain tarfile
    bank: list[str] = []
    for _, files in samples.values():
        text = files["txt"].decode().strip()
        if text not in bank and len(bank) < 12:
            bank.append(text)
    assert len(bank) == 12
    cfg, task = load_trained(pretrained)
    decoder = task.decoder(cfg, False, *image_norm_stats(cfg))
    tokenize = Tokenize.create(cfg.model.text)
    keys = list(samples)[:16]
    items = [decoder({"__key__": k, "__url__": "x", **samples[k][1]}, print) for k in keys]
    batch = task.collator(tokenize)(items)
    bank_tokens = tokenize(bank)
    with torch.no_grad():
        image = task.model.encode_image(batch["image"], normalize=False).double()
        text = task.model.encode_text(batch["input_ids"], batch["attention_mask"], normalize=False).double()
        bank_text = task.model.encode_text(bank_tokens["input_ids"], bank_tokens["attention_mask"], normalize=False)
    cos = torch.nn.functional.cosine_similarity
    own = cos(image, text, dim=-1)
    others = cos(image[:, None], bank_text.double()[None], dim=-1)  # (16, 12)
    expected = []
    for i, item in enumerate(items):
        best = max(others[i, j] for j, c in enumerate(bank) if c != item["caption"])
        expected.append(own[i] - best)
    got = torch.tensor([r["margin"] for r in rows[:16]], dtype=torch.float64)
    torch.testing.assert_close(got, torch.stack(expected), atol=1e-5, rtol=0)
    # a sample whose caption is in the bank never compares with itself: some own captions are, in these 16
    assert sum(item["caption"] in bank for item in items) > 0
    # the same parts directory refuses another bank (its rows would mix two definitions of the margin)
    assert main(["score", "--model", str(pretrained), "--data", str(noisy_tiny), "--out", str(out), "--quiet"]) == 2
    # and filter reads the column by name
    kept = tmp_path / "kept"
    assert main(["filter", "--src", str(noisy_tiny), "--scores", str(out), "--out", str(kept), "--top-fraction", "0.5",
                 "--column", "margin"]) == 0  # fmt: skip
    assert json.loads((kept / "dataset.json").read_text())["splits"]["train"]["num_samples"] == 300


def test_score_bad_sample_and_resume(fmnist_copy: Path, pretrained: Path, tmp_path: Path) -> None:
    shards = sorted((fmnist_copy / "train").glob("*.tar"))
    bad_key = sorted(tar_samples(shards[1]))[5]
    corrupt_image(shards[1], bad_key)
    out = tmp_path / "scores.parquet"
    first = score_dataset(pretrained, fmnist_copy, out, batch_size=64, progress=False)
    assert (first.scored_shards, first.skipped_shards, first.bad, first.combined) == (6, 0, 1, True)
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 600
    bad = [r for r in rows if r["bad_reason"] is not None]
    assert [(r["shard"], r["key"], r["score"]) for r in bad] == [(shards[1].name, bad_key, None)]
    assert bad[0]["bad_reason"].startswith("bad_image")

    parts = tmp_path / "scores.parquet.parts"
    mtimes = {p.name: p.stat().st_mtime_ns for p in parts.glob("*.parquet")}
    (parts / f"{shards[2].name}.parquet").unlink()
    out.unlink()
    again = score_dataset(pretrained, fmnist_copy, out, batch_size=64, progress=False)
    assert (again.scored_shards, again.skipped_shards) == (1, 5)
    for name, mtime in mtimes.items():
        if name != f"{shards[2].name}.parquet":
            assert (parts / name).stat().st_mtime_ns == mtime
    assert pq.read_table(out).to_pylist() == rows


def test_score_two_ranks_cover_every_sample_once(fmnist_tiny: Path, pretrained: Path, tmp_path: Path) -> None:
    out = tmp_path / "ranked.parquet"
    base = ["score", "--model", str(pretrained / "model.safetensors"), "--data", str(fmnist_tiny), "--out", str(out)]
    assert main([*base, "--rank", "0", "--world", "2", "--quiet"]) == 0
    assert not out.exists()
    assert sorted(p.name for p in (tmp_path / "ranked.parquet.parts").glob("*.parquet")) == [
        f"shard-00000{i}.tar.parquet" for i in (0, 2, 4)
    ]
    assert main([*base, "--rank", "1", "--world", "2", "--quiet"]) == 0
    keys = [(r["shard"], r["key"]) for r in pq.read_table(out).to_pylist()]
    assert len(keys) == len(set(keys)) == 600
    assert {k for _, k in keys} == set(_split(fmnist_tiny))


def test_score_ranks_started_together(fmnist_tiny: Path, pretrained: Path, tmp_path: Path) -> None:
    """As the docs run them: both ranks at once, racing to create the parts folder's meta.json (a shared temp
    name once made one of them fail on the other's rename)."""
    import subprocess
    import sys

    out = tmp_path / "together.parquet"
    base = [sys.executable, "-m", "data_tools", "score", "--model", str(pretrained), "--data", str(fmnist_tiny),
            "--out", str(out), "--world", "2", "--quiet", "--bank", "8"]  # fmt: skip
    procs = [subprocess.Popen([*base, "--rank", str(r)], stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    errors = [p.communicate()[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    rows = pq.read_table(out).to_pylist()
    assert len({(r["shard"], r["key"]) for r in rows}) == len(rows) == 600
    assert all(r["margin"] is not None for r in rows)
    assert not list((tmp_path / "together.parquet.parts").glob("*.tmp"))


def test_score_refuses_parts_of_another_run(fmnist_tiny: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "s.parquet"
    parts = tmp_path / "s.parquet.parts"
    parts.mkdir()
    (parts / "meta.json").write_text(json.dumps({"model": "elsewhere"}))
    assert main(["score", "--model", "x", "--data", str(fmnist_tiny), "--out", str(out)]) == 2
    assert "another run" in capsys.readouterr().err


def test_score_agreement_over_the_nearest_images(fmnist_copy: Path, pretrained: Path, tmp_path: Path) -> None:
    """``--neighbours``: agreement against a brute-force search over the model's own embeddings, consensus against
    the ranks, the bad sample null in both, two ranks the same table as one."""
    import numpy as np

    from mm_ptft.data.stats import image_norm_stats
    from mm_ptft.models import Tokenize
    from mm_ptft.tasks import load_trained

    shards = sorted((fmnist_copy / "train").glob("*.tar"))
    bad_key = sorted(tar_samples(shards[3]))[7]
    corrupt_image(shards[3], bad_key)
    out, single = tmp_path / "two.parquet", tmp_path / "one.parquet"
    for rank in (0, 1):
        score_dataset(pretrained, fmnist_copy, out, batch_size=64, rank=rank, world=2, progress=False, neighbours=5)
    assert score_dataset(pretrained, fmnist_copy, single, batch_size=100, progress=False, neighbours=5).combined
    rows = pq.read_table(out).to_pylist()
    assert rows == pq.read_table(single).to_pylist()
    assert [r["key"] for r in rows if r["agreement"] is None] == [bad_key]
    assert [r["key"] for r in rows if r["consensus"] is None] == [bad_key]

    cfg, task = load_trained(pretrained)
    decoder = task.decoder(cfg, False, *image_norm_stats(cfg))
    samples = _split(fmnist_copy)
    good = [r for r in rows if r["bad_reason"] is None]
    batch = task.collator(Tokenize.create(cfg.model.text))(
        [decoder({"__key__": r["key"], "__url__": "x", **samples[r["key"]][1]}, print) for r in good]
    )
    with torch.no_grad():
        image = task.model.encode_image(batch["image"]).double().numpy()
        text = task.model.encode_text(batch["input_ids"], batch["attention_mask"]).double().numpy()
    sims = image @ image.T
    np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1)
    expected = np.array([(text[i] @ text[order[i, :5]].T).mean() for i in range(len(good))])
    ranked = np.take_along_axis(sims, order[:, :6], axis=1)
    clear = ranked[:, 4] - ranked[:, 5] > 1e-5  # the 5th and 6th nearest not a near tie the search may swap
    assert clear.mean() > 0.9
    got = np.array([r["agreement"] for r in good])
    np.testing.assert_allclose(got[clear], expected[clear], atol=1e-5)

    def ranks(v):  # how many values are below, ties sharing the mean of their places, over N
        below, equal = (v[None] < v[:, None]).sum(1), (v[None] == v[:, None]).sum(1)
        return (below + (equal - 1) / 2) / len(v)

    consensus = (ranks(np.array([r["score"] for r in good])) + ranks(got)) / 2
    np.testing.assert_allclose([r["consensus"] for r in good], consensus, atol=1e-9)
    # parts scored without embeddings are not reused for agreement
    assert main(["score", "--model", str(pretrained), "--data", str(fmnist_copy), "--out", str(out), "--quiet"]) == 2


def test_caption_agreement_skips_the_row_itself_among_twins() -> None:
    import numpy as np

    from data_tools.curate import caption_agreement

    image = np.eye(4, dtype=np.float32)[[0, 0, 1, 2, 3]]  # rows 0 and 1 the same image
    text = np.eye(5, dtype=np.float32)
    text[1] = text[0]  # and the same caption: each is the other's one nearest image, agreement 1
    got = caption_agreement(image, text, 1)
    assert got[0] == got[1] == 1.0
    assert np.isnan(caption_agreement(image[:1], text[:1], 3)).all()
    # more rows than one search block: the same as brute force
    rng = np.random.default_rng(0)
    image, text = (rng.normal(size=(5000, 8)).astype(np.float32) for _ in range(2))
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    sims = image.astype(np.float64) @ image.T.astype(np.float64)
    np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1)
    expected = np.einsum("nd,nkd->n", text.astype(np.float64), text.astype(np.float64)[order[:, :3]]) / 3
    ranked = np.take_along_axis(sims, order[:, 2:4], axis=1)
    clear = ranked[:, 0] - ranked[:, 1] > 1e-5  # no near tie at the 3rd neighbour for float32 search to swap
    assert clear.mean() > 0.99
    np.testing.assert_allclose(caption_agreement(image, text, 3)[clear], expected[clear], atol=1e-5)
