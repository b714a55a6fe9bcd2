"""Curation: ``corrupt-captions`` (a measured amount of caption noise) and ``score`` (image-text similarity under a
trained model), the first steps of score → filter → train again.

``corrupt-captions`` copies a dataset dir; in one split it replaces a seeded ``fraction`` of the captions with the
caption of another sample of that split whose text differs, keeping keys, shard layout, images and labels. What it
did is in ``OUT/corrupted.parquet`` (``key, shard, replaced, source_key``) and in each sample's json
(``"caption_replaced"``).

``score`` writes one row per sample, ``(shard, key, score, bad_reason)``: the cosine of the normalised image and
text embeddings, or a null score and the reason the sample could not be read. With ``--bank N`` a ``margin`` column
too: the score minus the image's best cosine to any other caption of a fixed bank (the split's first N distinct
captions in shard order, the same on every rank), excluding the sample's own text. A replaced caption scores below
captions that describe the image, so its margin is negative; a clean one's is near or above zero. Unlike the raw
cosine, the margin is measured against each image's own alternatives, so it does not favour images (or classes)
the model scores high with any text. With ``--neighbours K`` two more: ``agreement``, the mean cosine of the
sample's caption embedding with the caption embeddings of its image's K nearest images (faiss, over the image
embeddings of the whole split, the sample itself excluded): how well the caption agrees with what the captions of
similar images say, a vote of the split that does not rest on the model matching this one pair; and
``consensus``, the mean of ``score``'s and ``agreement``'s ranks (each in [0, 1)), the column to filter on. A
replaced caption is often one the model half believes (a shirt captioned "pullover"): its own cosine is fair, but
the shirts around it are captioned "shirt". Each shard's rows go to
``OUT.parts/<shard>.parquet`` first (a rerun skips the shards that have one; ``--rank R --world N`` takes shard
i where i % N == R), and the parts are combined into OUT once all of them exist. With ``--neighbours`` each part
also has ``<shard>.npz``, the image and text embeddings of its readable rows (float32, 2 × D × 4 bytes a sample),
and the process that combines computes the two columns over all of them.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from braceexpand import braceexpand
from tqdm import tqdm

from data_tools.shards import (
    DATASET_JSON,
    TMP_SUFFIX,
    DataToolsError,
    atomic_write_bytes,
    atomic_write_json,
    finish_split,
    prepare_split_dir,
    process_tmp,
    read_json,
)
from data_tools.subset import RawShardWriter
from data_tools.verify import BrokenTarError, iter_tar_samples

CORRUPTED_PARQUET = "corrupted.parquet"
PARTS_META = "meta.json"
_TRY_DRAWS = 64  # random draws for a differing caption before falling back to listing every candidate


# ---------------------------------------------------------------------------------------------- corrupt-captions
def dataset_meta(src: Path) -> dict:
    """``src``'s dataset.json.

    Raises:
        DataToolsError: ``src`` has none (not a data_tools dataset dir) or it does not parse.
    """
    if not (src / DATASET_JSON).is_file():
        raise DataToolsError(f"{src} has no {DATASET_JSON} (write it with python -m data_tools)")
    return read_json(src / DATASET_JSON)


def split_shards(root: Path, meta: dict, split: str) -> list[Path]:
    """The shard paths of ``split`` under ``root``, in pattern order.

    Raises:
        DataToolsError: ``split`` is not in ``meta``.
    """
    splits = meta.get("splits", {})
    if split not in splits:
        raise DataToolsError(f"split {split!r} not in {root / DATASET_JSON} (has: {', '.join(splits)})")
    return [Path(url) for url in braceexpand(str(root / splits[split]["pattern"]))]


def _read_shard(path: Path) -> list[dict[str, Any]]:
    try:
        return [{"__key__": key, **files} for key, files in iter_tar_samples(path)]
    except (BrokenTarError, OSError) as exc:
        raise DataToolsError(f"cannot read {path}: {exc} (run python -m data_tools verify)") from None


def choose_replacements(captions: list[bytes], fraction: float, seed: int) -> dict[int, int]:
    """``{sample index: index of the sample whose caption it gets}`` for ``round(fraction * n)`` seeded samples;
    every source caption differs from the caption it replaces.

    Raises:
        DataToolsError: A chosen sample's caption equals every other caption (nothing to replace it with).
    """
    n = len(captions)
    rng = random.Random(seed)
    chosen = sorted(rng.sample(range(n), round(fraction * n)))
    sources: dict[int, int] = {}
    for i in chosen:
        for _ in range(_TRY_DRAWS):
            j = rng.randrange(n)
            if captions[j] != captions[i]:
                break
        else:  # almost every caption is this one: draw among the few that differ
            candidates = [j for j in range(n) if captions[j] != captions[i]]
            if not candidates:
                raise DataToolsError(f"every caption of the split is {captions[i][:60]!r}: none can replace another")
            j = rng.choice(candidates)
        sources[i] = j
    return sources


def _mark(sample: dict[str, Any], replaced: bool) -> bytes:
    meta = json.loads(sample["json"]) if "json" in sample else {}
    if not isinstance(meta, dict):
        raise DataToolsError(f"sample {sample['__key__']}: json is not an object, cannot record caption_replaced")
    meta["caption_replaced"] = replaced
    return json.dumps(meta, ensure_ascii=False).encode("utf-8")


def copy_dataset_files(src: Path, out: Path, skip: set[str], overwrite: bool) -> None:
    """Copy every file and folder of ``src`` but those named in ``skip`` into ``out`` byte for byte (other splits,
    class names, templates; dataset.json, which the caller rewrites).

    Raises:
        DataToolsError: A file to copy already exists in ``out`` and ``overwrite`` is false.
    """
    out.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.name in skip:
            continue
        if item.is_dir():
            shutil.copytree(item, out / item.name, dirs_exist_ok=overwrite)
        elif (out / item.name).exists() and not overwrite and item.name != DATASET_JSON:
            raise DataToolsError(f"{out / item.name} exists; pass --overwrite to replace it")
        else:
            shutil.copy2(item, out / item.name)


def write_corrupted_captions(
    src: Path, out: Path, fraction: float, seed: int = 0, split: str = "train", overwrite: bool = False
) -> tuple[dict, int]:
    """Copy ``src`` to ``out`` with ``round(fraction * n)`` captions of ``split`` replaced (see the module doc).

    Returns:
        (the split's dataset.json entry, number of captions replaced).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not 0 <= fraction <= 1:
        raise DataToolsError(f"--fraction must be in [0, 1], got {fraction}")
    if out.resolve() == src.resolve():
        raise DataToolsError("--out must differ from --src")
    meta = dataset_meta(src)
    paths = split_shards(src, meta, split)
    shards = [_read_shard(p) for p in paths]
    flat = [(p.name, s) for p, samples in zip(paths, shards, strict=True) for s in samples]
    missing = [s["__key__"] for _, s in flat if "txt" not in s]
    if missing:
        raise DataToolsError(f"{len(missing)} samples of {split} have no caption (txt), e.g. {missing[0]}")
    sources = choose_replacements([s["txt"] for _, s in flat], fraction, seed)

    copy_dataset_files(src, out, {split, CORRUPTED_PARQUET}, overwrite)
    split_dir = prepare_split_dir(out, split, overwrite)

    rows: dict[str, list] = {"key": [], "shard": [], "replaced": [], "source_key": []}
    index = 0
    with ShardCopyWriter(split_dir, split, max((len(s) for s in shards), default=1) or 1) as writer:
        for samples in tqdm(shards, desc=f"writing {split}", unit="shard", file=sys.stderr):
            writer.next_shard()
            for sample in samples:
                source = sources.get(index)
                copy = dict(sample, json=_mark(sample, source is not None))
                if source is not None:
                    copy["txt"] = flat[source][1]["txt"]
                writer.write(copy)
                rows["key"].append(sample["__key__"])
                rows["shard"].append(flat[index][0])
                rows["replaced"].append(source is not None)
                rows["source_key"].append(flat[source][1]["__key__"] if source is not None else None)
                index += 1
    name = f"{meta.get('name', src.name)}-corrupt{fraction:g}-s{seed}"
    atomic_write_json(out / DATASET_JSON, {**meta, "name": name})
    entry = finish_split(out, split, writer.sizes, name)
    schema = pa.schema(
        [("key", pa.string()), ("shard", pa.string()), ("replaced", pa.bool_()), ("source_key", pa.string())]
    )
    tmp = out / (CORRUPTED_PARQUET + TMP_SUFFIX)
    pq.write_table(pa.table(rows, schema=schema), tmp)
    os.replace(tmp, out / CORRUPTED_PARQUET)
    return entry, len(sources)


class ShardCopyWriter(RawShardWriter):
    """Raw sample writer whose shard boundaries follow the source's (``next_shard``), so shard names and counts,
    and hence each sample's (shard, key), stay those of the source."""

    def next_shard(self) -> None:
        self._finish_shard()
        self._start_shard()


# ------------------------------------------------------------------------------------------------------- score
@dataclass
class ScoreResult:
    """What one ``score`` process did: shards it scored / skipped, samples scored, bad samples, combined or not."""

    scored_shards: int
    skipped_shards: int
    samples: int
    bad: int
    combined: bool


class _LastReason:
    """The ``log`` a decoder reports a bad sample to: keeps the reason instead of warning."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def __call__(self, reason: str, url: str, detail: str) -> None:
        self.reason = f"{reason}: {detail}"


def _parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def _part_path(parts: Path, shard: Path) -> Path:
    return parts / f"{shard.name}.parquet"


def _score_schema(margin: bool = False):
    """A part's columns (``_combine`` adds ``agreement`` and ``consensus`` before ``bad_reason``)."""
    import pyarrow as pa

    fields = [("shard", pa.string()), ("key", pa.string()), ("score", pa.float64())]
    return pa.schema(fields + ([("margin", pa.float64())] if margin else []) + [("bad_reason", pa.string())])


def _write_parquet(rows: dict[str, list], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = process_tmp(path)
    pq.write_table(pa.table(rows, schema=_score_schema("margin" in rows)), tmp)
    os.replace(tmp, path)


def _check_parts_meta(parts: Path, identity: dict) -> None:
    path = parts / PARTS_META
    if path.is_file():
        old = read_json(path)
        if old != identity:
            raise DataToolsError(
                f"{parts} holds scores of another run ({old}); delete it or choose another --out to start afresh"
            )
    else:
        atomic_write_json(path, identity)


class Scorer:
    """A trained model's image-text cosine for raw shard samples: the task's evaluation decoder (``train=False``
    transforms) and collator with the model's own tokenizer, as every evaluation prepares batches."""

    def __init__(self, model: str | Path, device: str = "cpu") -> None:
        """Load ``model`` (run dir, checkpoint dir or weights file) with :func:`mm_ptft.tasks.load_trained`."""
        import torch

        from mm_ptft.config import ConfigError
        from mm_ptft.data.stats import image_norm_stats
        from mm_ptft.models import Tokenize
        from mm_ptft.tasks import load_trained

        try:
            cfg, task = load_trained(model)
        except (ConfigError, RuntimeError, OSError) as exc:  # RuntimeError: mm_ptft's CheckpointError
            raise DataToolsError(f"cannot load model {model}: {exc}") from None
        if not (hasattr(task, "encode_image") and hasattr(task, "encode_text")):
            raise DataToolsError(f"{model} is a {cfg.task!r} model; score needs an image-text (contrastive) one")
        self.device = torch.device(device)
        self.task = task.to(self.device)
        mean, std = image_norm_stats(cfg)
        self.decoder = task.decoder(cfg, False, mean, std)
        self.tokenize = Tokenize.create(cfg.model.text)
        self.collator = task.collator(self.tokenize)
        self.bank: list[str] = []  # captions the margin compares against (set_bank)
        self.bank_vectors = None  # (M, D) float32 tensor on the device

    def set_bank(self, captions: list[str], batch_size: int = 256) -> None:
        """Embed ``captions`` as the bank the margin is measured against (see the module doc)."""
        import numpy as np
        import torch

        self.bank = list(captions)
        vectors = [self.encode_texts(self.bank[i : i + batch_size]) for i in range(0, len(self.bank), batch_size)]
        self.bank_vectors = torch.from_numpy(np.concatenate(vectors)).to(self.device)
        self._bank_index = {c: i for i, c in enumerate(self.bank)}

    def decode(self, raw: dict) -> tuple[dict | None, str | None]:
        """(decoded sample, None) or (None, the reason it is unusable)."""
        log = _LastReason()
        item = self.decoder(raw, log)
        return item, (None if item is not None else log.reason or "unusable")

    def score(self, items: list[dict]) -> tuple[list[float], list[float] | None, Any, Any]:
        """(cosine of each decoded item's image and caption, its margin over the bank or None without a bank, the
        L2-normalised image and text embeddings as (B, D) float32 numpy arrays)."""
        import torch

        batch = self.collator(items)
        with torch.no_grad():
            image = self.task.encode_image(batch["image"].to(self.device)).float()  # (B, D), L2-normalised
            text = self.task.encode_text(
                batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
            ).float()  # (B, D), L2-normalised
            score = (image * text).sum(-1)
            vectors = image.cpu().numpy(), text.cpu().numpy()
            if self.bank_vectors is None:
                return score.cpu().tolist(), None, *vectors
            others = image @ self.bank_vectors.T  # (B, M)
            own = [self._bank_index.get(item["caption"]) for item in items]
            rows = [i for i, j in enumerate(own) if j is not None]
            others[rows, [own[i] for i in rows]] = -float("inf")  # never the sample's own text
            margin = score - others.max(-1).values
        return score.cpu().tolist(), margin.cpu().tolist(), *vectors

    def encode_images(self, items: list[dict]):
        """L2-normalised image embeddings of decoded items, a (B, D) float32 numpy array (``dedup``'s vectors)."""
        import torch

        with torch.no_grad():
            image = self.task.encode_image(torch.stack([item["image"] for item in items]).to(self.device))
        return image.float().cpu().numpy()

    def encode_texts(self, texts: list[str]):
        """L2-normalised text embeddings of captions, a (B, D) float32 numpy array (``filter``'s caption clusters)."""
        import torch

        tokens = self.tokenize(texts)
        with torch.no_grad():
            text = self.task.encode_text(tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device))
        return text.float().cpu().numpy()


def _score_shard(
    scorer: Scorer, shard: Path, batch_size: int, keep_vectors: bool = False
) -> tuple[dict[str, list], dict[str, list]]:
    """(the shard's rows, {"image", "text"}: the embeddings of its scored rows in row order, batch by batch, when
    ``keep_vectors``; empty lists otherwise)."""
    values = ["score"] + (["margin"] if scorer.bank else [])
    rows: dict[str, list] = {"shard": [], "key": [], **{v: [] for v in values}, "bad_reason": []}
    vectors: dict[str, list] = {"image": [], "text": []}
    pending: list[tuple[int, dict]] = []  # (row index, decoded item) waiting for a full batch

    def add(key: str | None, reason: str | None) -> int:
        rows["shard"].append(shard.name)
        rows["key"].append(key)
        for v in values:
            rows[v].append(None)
        rows["bad_reason"].append(reason)
        return len(rows["key"]) - 1

    def flush() -> None:
        scores, margins, image, text = scorer.score([item for _, item in pending])
        for i, (row, _) in enumerate(pending):
            rows["score"][row] = scores[i]
            if margins is not None:
                rows["margin"][row] = margins[i]
        if keep_vectors:
            vectors["image"].append(image)
            vectors["text"].append(text)
        pending.clear()

    try:
        for key, files in iter_tar_samples(shard):
            item, reason = scorer.decode({"__key__": key, "__url__": str(shard), **files})
            row = add(key, reason)
            if item is not None:
                pending.append((row, item))
                if len(pending) >= batch_size:
                    flush()
    except (BrokenTarError, OSError) as exc:  # the samples before the break are scored; the break is one row
        add(getattr(exc, "key", None), f"tar_error: {exc}")
    if pending:
        flush()
    return rows, vectors


def score_dataset(
    model: str | Path,
    data: Path,
    out: Path,
    split: str = "train",
    batch_size: int = 256,
    rank: int = 0,
    world: int = 1,
    device: str = "cpu",
    progress: bool = True,
    bank: int = 0,
    neighbours: int = 0,
    index: str = "flat",
) -> ScoreResult:
    """Score every sample of ``data``'s ``split`` this rank owns (see the module doc) and combine the parts into
    ``out`` once every shard has one; ``bank`` > 0 adds the ``margin`` column over that many distinct captions,
    ``neighbours`` > 0 the ``agreement`` and ``consensus`` columns over that many nearest images (``index``: the
    faiss index of the image embeddings, ``flat`` exact or ``ivf``).

    Raises:
        DataToolsError: bad rank / world, a missing split, a model that is not image-text, parts of another run,
            a split with fewer than two distinct captions for a bank.
    """
    if world < 1 or not 0 <= rank < world:
        raise DataToolsError(f"--rank must be in [0, --world), got rank {rank}, world {world}")
    if batch_size < 1:
        raise DataToolsError(f"--batch-size must be at least 1, got {batch_size}")
    if bank < 0:
        raise DataToolsError(f"--bank must be 0 (no margin) or more, got {bank}")
    if neighbours < 0:
        raise DataToolsError(f"--neighbours must be 0 (no agreement) or more, got {neighbours}")
    if index not in ("flat", "ivf"):
        raise DataToolsError(f"--index must be flat or ivf, got {index!r}")
    shards = split_shards(data, dataset_meta(data), split)
    parts = _parts_dir(out)
    parts.mkdir(parents=True, exist_ok=True)
    identity = {"model": str(Path(model).resolve()), "data": str(data.resolve()), "split": split}
    extra = ({"bank": bank} if bank else {}) | ({"neighbours": neighbours} if neighbours else {})
    _check_parts_meta(parts, identity | extra)  # the part files differ with a bank or neighbours
    mine = [s for i, s in enumerate(shards) if i % world == rank]
    todo = [s for s in mine if not _part_path(parts, s).is_file()]
    scorer = Scorer(model, device) if todo else None
    if scorer is not None and bank:
        scorer.set_bank(caption_bank(shards, bank, getattr(scorer.decoder, "caption_key", "txt")), batch_size)
    samples = bad = 0
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"score rank {rank}", unit="shard",
               file=sys.stderr, disable=not progress)  # fmt: skip
    for shard in todo:
        rows, vectors = _score_shard(scorer, shard, batch_size, keep_vectors=neighbours > 0)
        if neighbours:  # before the parquet, whose presence marks the shard done
            _write_vectors(vectors, _vectors_path(parts, shard))
        _write_parquet(rows, _part_path(parts, shard))
        samples += len(rows["key"])
        bad += sum(r is not None for r in rows["bad_reason"])
        bar.update(1)
        bar.set_postfix(samples=samples, bad=bad)
    bar.close()
    combined = all(_part_path(parts, s).is_file() for s in shards)
    if combined:
        _combine(shards, parts, out, margin=bank > 0, neighbours=neighbours, index=index)
    return ScoreResult(len(todo), len(mine) - len(todo), samples, bad, combined)


def caption_bank(shards: list[Path], size: int, caption_key: str = "txt") -> list[str]:
    """The first ``size`` distinct captions of ``shards`` in order (stripped, as the decoder reads them); fewer
    when the split has fewer. Every rank reads the same shards in the same order, so every rank gets this bank.

    Raises:
        DataToolsError: fewer than two distinct captions (a margin needs another caption to compare with).
    """
    seen: dict[str, None] = {}
    for shard in shards:
        try:
            for _, files in iter_tar_samples(shard):
                text = files.get(caption_key)
                caption = text.decode("utf-8", errors="replace").strip() if text else ""
                if caption:
                    seen.setdefault(caption)
                    if len(seen) >= size:
                        return list(seen)
        except (BrokenTarError, OSError):  # the scorer reports the break as a row; the bank takes what came before
            continue
    if len(seen) < 2:
        raise DataToolsError(f"--bank needs at least 2 distinct captions in the split, found {len(seen)}")
    return list(seen)


def _vectors_path(parts: Path, shard: Path) -> Path:
    return parts / f"{shard.name}.npz"


def _write_vectors(vectors: dict[str, list], path: Path) -> None:
    import numpy as np

    empty = np.zeros((0, 0), dtype=np.float32)
    arrays = {k: np.concatenate(vectors[k]) if vectors[k] else empty for k in ("image", "text")}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def _read_vectors(shards: list[Path], parts: Path) -> tuple[Any, Any]:
    """The image and text embeddings of every scored row of ``shards``, in table order."""
    import numpy as np

    images, texts = [], []
    for shard in shards:
        path = _vectors_path(parts, shard)
        try:
            with np.load(path) as z:
                if len(z["image"]):
                    images.append(z["image"])
                    texts.append(z["text"])
        except (OSError, ValueError, KeyError) as exc:
            raise DataToolsError(f"cannot read {path}: {exc} (delete {parts} and score again)") from None
    if not images:
        return np.zeros((0, 1), np.float32), np.zeros((0, 1), np.float32)
    return np.concatenate(images), np.concatenate(texts)


def caption_agreement(image, text, k: int, index: str = "flat"):
    """For each row: the mean inner product of its ``text`` row with the ``text`` rows of the ``k`` rows whose
    ``image`` rows are nearest (inner product, the row itself excluded; fewer when there are fewer other rows).
    ``image`` and ``text``: (N, D) float32, L2-normalised. Returns (N,) float64; NaN for a row with no other row
    found (N < 2, or an IVF search whose cells held none)."""
    import numpy as np

    from data_tools.dedup import build_index

    n = len(image)
    if n < 2:
        return np.full(n, np.nan)
    k = min(k, n - 1)
    image = np.ascontiguousarray(image, dtype=np.float32)
    text = np.asarray(text, dtype=np.float64)
    search = build_index(image, index)
    agreement = np.empty(n)
    block = max(1, min(4096, (1 << 24) // ((k + 1) * text.shape[1])))  # bounds the (block, k, D) gather
    for start in range(0, n, block):
        rows = np.arange(start, min(start + block, n))
        _, ids = search.search(image[rows], k + 1)
        # the row itself is usually first, but an exact twin can come before it: drop it wherever it is, and
        # keep the first k others (-1: fewer were found, as an IVF index may)
        other = (ids != rows[:, None]) & (ids >= 0)
        other &= np.cumsum(other, axis=1) <= k
        sims = np.einsum("nd,nkd->nk", text[rows], text[np.where(other, ids, 0)])
        found = other.sum(1)
        agreement[rows] = np.where(found > 0, (sims * other).sum(1) / np.maximum(found, 1), np.nan)
    return agreement


def _ranks(values):
    """Each value's rank among ``values`` in [0, 1): (rank from 0, ties averaged) / N."""
    import numpy as np

    _, where, counts = np.unique(values, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts  # rank from 0 of each distinct value's first copy
    return (first + (counts - 1) / 2)[where] / len(values)


def _combine(
    shards: list[Path], parts: Path, out: Path, margin: bool = False, neighbours: int = 0, index: str = "flat"
) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = _score_schema(margin)
    table = pa.concat_tables([pq.read_table(_part_path(parts, s), schema=schema) for s in shards])
    if neighbours:
        image, text = _read_vectors(shards, parts)
        scored = np.flatnonzero(table["score"].is_valid().to_numpy(zero_copy_only=False))
        if len(scored) != len(image):
            raise DataToolsError(f"{parts}: {len(scored)} scored rows but {len(image)} embeddings; delete it and "
                                 "score again")  # fmt: skip
        agreement, consensus = np.full(len(table), np.nan), np.full(len(table), np.nan)
        if len(scored):
            agreement[scored] = caption_agreement(image, text, neighbours, index)
            both = scored[np.isfinite(agreement[scored])]  # ranked among the rows that have both values
            if len(both):
                score = table["score"].to_numpy(zero_copy_only=False)[both]
                consensus[both] = (_ranks(score) + _ranks(agreement[both])) / 2
        at = table.schema.get_field_index("bad_reason")
        table = table.add_column(at, "agreement", pa.array(agreement, pa.float64(), mask=np.isnan(agreement)))
        table = table.add_column(at + 1, "consensus", pa.array(consensus, pa.float64(), mask=np.isnan(consensus)))
    tmp = process_tmp(out)  # ranks finishing together never share a temp file
    pq.write_table(table, tmp)
    os.replace(tmp, out)


__all__ = [
    "CORRUPTED_PARQUET",
    "ScoreResult",
    "Scorer",
    "ShardCopyWriter",
    "caption_agreement",
    "caption_bank",
    "choose_replacements",
    "copy_dataset_files",
    "dataset_meta",
    "score_dataset",
    "split_shards",
    "write_corrupted_captions",
]
