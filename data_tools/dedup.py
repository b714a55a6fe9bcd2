"""Curation: ``dedup`` — remove exact and near-duplicate images from one split, keeping one copy of each group.

- **Exact** duplicates: samples whose image bytes have the same sha256. Always.
- **Near** duplicates (with ``--model``): samples whose L2-normalised image embeddings under a contrastive model
  (the evaluation view, as ``score`` reads it) have a cosine similarity of at least ``--threshold``. Vectors go into
  a faiss inner-product index: ``flat`` (exact search) or ``ivf`` (``IndexIVFFlat``, ``nlist`` ≈ √N cells, ``nprobe``
  of them searched: faster for large N, may miss a pair whose two vectors fall in different cells). Each vector's
  ``k`` nearest neighbours are searched; where even the k-th is above the threshold, a range search finds the rest,
  so every pair above the threshold is found (by a flat index).
- **Near** duplicates without a model (``--pixels``): a pixel descriptor of a 28 × 28 grayscale thumbnail, compared
  under a small grid of zooms and shifts so re-encoded, resized and lightly cropped copies match
  (:mod:`data_tools.pixels`; default threshold 0.998). It tells one item from a look-alike where a contrastive model,
  trained to map a class's images together, cannot; it does not see through larger crops, flips or colour changes.
- Pairs of both kinds are joined into groups (union-find: a chain a~b, b~c is one group even when a and c are
  further apart than the threshold). Each group keeps one sample: the first in ``(shard, key)`` order, or with
  ``--keep highest-score --scores PARQUET`` the one with the highest score (null scores last, then ``(shard, key)``;
  the table must name every sample of the split, as for ``filter``).

A sample without an image, or whose image the model cannot decode, is kept and takes part in exact matching only.
Embeddings are streamed shard by shard in batches into one preallocated N × D float32 matrix (N from dataset.json;
nothing else grows with N but per-sample keys and hashes). The output is written like ``filter``'s (same shard
names, kept samples byte for byte, other splits copied), plus ``OUT/duplicates.parquet`` — one row per member of a
group: ``key, shard, group, kept, kind`` (``exact`` if its bytes equal the kept copy's, else ``near``; null for the
kept copy) and ``similarity`` (cosine to the kept copy; 1.0 for an exact copy without embeddings; null for the kept
copy) — and a report (``--report DIR``, default ``OUT/curation/``): ``report.md``, ``dedup.json``,
``nn_similarity_hist.png`` (each sample's nearest-neighbour similarity, the threshold) and ``grid_duplicates.png``
(removed copies next to the copy kept, the pairs closest to the threshold first).
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from data_tools.curate import dataset_meta, split_shards
from data_tools.filter import (
    DUPLICATES_PARQUET,
    REPORT_DIR,
    SplitScan,
    align_scores,
    draw_grid,
    image_of,
    import_faiss,
    iter_split,
    new_figure,
    read_scores,
    write_selection,
)
from data_tools.shards import TMP_SUFFIX, DataToolsError, atomic_write_bytes, atomic_write_json

DEDUP_JSON = "dedup.json"
DEFAULT_THRESHOLD = 0.95
DEFAULT_NPROBE = 8
NEIGHBOURS = 16  # k of the k-NN search; queries with more than k - 1 neighbours above the threshold get a range search
_RESULTS_PER_BATCH = 1 << 24  # bounds one range search's result buffers (× 12 bytes) whatever the data looks like
_KNN_BATCH = 4096  # queries per k-NN search
GRID_PAIRS = 8


# --------------------------------------------------------------------------------------------- the pair search
def build_index(vectors, kind: str = "flat", nlist: int | None = None, nprobe: int = DEFAULT_NPROBE, seed: int = 0):
    """A faiss inner-product index over ``vectors`` ((N, D) float32, L2-normalised rows).

    Args:
        vectors: The embeddings; C-contiguous float32.
        kind: ``flat`` (exact) or ``ivf`` (inverted lists, trained by k-means on at most 64 × nlist vectors).
        nlist: IVF cells (default ``round(sqrt(N))``).
        nprobe: IVF cells searched per query.
        seed: Seed of the IVF training sample and k-means.
    """
    import numpy as np

    faiss = import_faiss()
    n, dim = vectors.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "ivf":
        nlist = max(1, min(n, nlist or round(math.sqrt(n))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        train = vectors
        if n > 64 * nlist:
            train = vectors[np.sort(np.random.default_rng(seed).choice(n, 64 * nlist, replace=False))]
        index.train(train)
        index.nprobe = min(nprobe, nlist)
    else:
        raise DataToolsError(f"--index must be flat or ivf, got {kind!r}")
    index.add(vectors)
    return index


def search_pairs(index, vectors, threshold: float, k: int = NEIGHBOURS, queries=None) -> tuple[Any, Any, Any, Any]:
    """Every pair of rows of ``vectors`` with inner product ≥ ``threshold`` (as far as ``index`` finds them), and
    each row's nearest-neighbour similarity. ``queries`` (default ``vectors``): what row i searches with — another
    view of the same row (a transformed image), so row i is still never its own pair.

    Returns:
        (i, j, similarity, nearest): int64 arrays with i < j, each pair once, sorted by (i, j); their float32
        similarities; ``nearest`` (N,) float32, the highest similarity to any other row (NaN for a single row).
    """
    import numpy as np

    n = vectors.shape[0]
    k = max(2, min(k, n))
    nearest = np.full(n, np.nan, dtype=np.float32)
    found: list[Any] = []
    # k-NN queries go in large blocks (faiss's flat search is ~6x slower per query in blocks of a few hundred); the
    # few queries whose k-th neighbour is above the threshold are range-searched in chunks whose worst-case result
    # buffers (every row a hit) stay under _RESULTS_PER_BATCH
    batch, range_batch = _KNN_BATCH, max(1, _RESULTS_PER_BATCH // max(n, 1))
    for start in range(0, n, batch):
        query = (vectors if queries is None else queries)[start : start + batch]
        rows = np.arange(start, start + len(query))
        sims, ids = index.search(query, k)  # (Q, k) each, best first; -1 ids where fewer than k were found
        other = (ids != rows[:, None]) & (ids >= 0)
        first = np.argmax(other, axis=1)
        has = other[np.arange(len(query)), first]
        nearest[start : start + len(query)][has] = sims[np.arange(len(query)), first][has]
        hit = other & (sims >= threshold)
        # even the k-th neighbour is above the threshold, so more may be: those queries get a range search instead
        full = (ids[:, -1] >= 0) & (sims[:, -1] >= threshold) if k < n else np.zeros(len(query), bool)
        q, c = np.nonzero(hit & ~full[:, None])
        found.append(np.stack([rows[q], ids[q, c], sims[q, c]]).T if len(q) else np.empty((0, 3)))
        full_rows = np.nonzero(full)[0]
        for chunk in range(0, len(full_rows), range_batch):
            picked = full_rows[chunk : chunk + range_batch]
            lims, dist, labels = index.range_search(query[picked], float(np.nextafter(np.float32(threshold), -1)))
            owner = np.repeat(rows[picked], np.diff(lims.astype(np.int64)))
            keep = (labels != owner) & (dist >= threshold)
            found.append(np.stack([owner[keep], labels[keep], dist[keep]]).T)
    pairs = np.concatenate(found) if found else np.empty((0, 3))
    lo = np.minimum(pairs[:, 0], pairs[:, 1]).astype(np.int64)
    hi = np.maximum(pairs[:, 0], pairs[:, 1]).astype(np.int64)
    _, first = np.unique(lo * n + hi, return_index=True)  # each pair once, whichever side found it
    return lo[first], hi[first], pairs[first, 2].astype(np.float32), nearest


class UnionFind:
    """Disjoint sets over 0..n-1 (path halving, union by size)."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))
        self.size = [1] * n

    def find(self, x: int) -> int:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        if self.size[a] < self.size[b]:
            a, b = b, a
        self.parent[b] = a
        self.size[a] += self.size[b]


# ----------------------------------------------------------------------------------------------------- reading
@dataclass
class DedupScan:
    """The split as ``dedup`` read it: ids and hashes per complete sample, embeddings of the decodable ones."""

    scan: SplitScan
    digests: list[bytes | None] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)  # row of the sample's embedding, -1 where none
    vectors: Any = None  # (embedded, D) view of the preallocated matrix (float32 embeddings; uint8 thumbnails with
    # --pixels), or None without either
    pixels: bool = False


def content_hash(data: bytes) -> bytes:
    """sha256 digest of encoded image bytes."""
    return hashlib.sha256(data).digest()


def _scan_for_dedup(src: Path, split: str, scorer, batch_size: int, progress: bool) -> DedupScan:
    import numpy as np

    meta = dataset_meta(src)
    scan = SplitScan(shards=split_shards(src, meta, split))
    from data_tools.pixels import PixelDescriptor

    result = DedupScan(scan, pixels=isinstance(scorer, PixelDescriptor))
    capacity = meta["splits"][split].get("num_samples")
    if scorer is not None and not isinstance(capacity, int):
        raise DataToolsError(f"{src / 'dataset.json'} gives no num_samples for {split} (rewrite it with data_tools)")
    matrix = None
    embedded = 0
    pending: list[tuple[int, dict]] = []  # (sample index, decoded item)

    def flush() -> None:
        nonlocal matrix, embedded
        vectors = scorer.encode_images([item for _, item in pending])  # (B, D), L2-normalised
        if matrix is None:
            matrix = np.empty((capacity, vectors.shape[1]), dtype=vectors.dtype)
        if embedded + len(vectors) > capacity:
            raise DataToolsError(f"{split} holds more samples than dataset.json's {capacity} (run data_tools verify)")
        matrix[embedded : embedded + len(vectors)] = vectors
        for (index, _), row in zip(pending, range(embedded, embedded + len(vectors)), strict=True):
            result.rows[index] = row
        embedded += len(vectors)
        pending.clear()

    for shard, key, files in iter_split(scan.shards, f"reading {split}", progress):
        if files is None:
            scan.broken.append((shard, key))
            continue
        image = image_of(files)
        scan.ids.append((shard, key))
        result.digests.append(None if image is None else content_hash(image))
        result.rows.append(-1)
        if scorer is not None and image is not None:
            item, _ = scorer.decode({"__key__": key, "__url__": shard, **files})
            if item is not None:
                pending.append((len(scan.ids) - 1, item))
                if len(pending) >= batch_size:
                    flush()
    if pending:
        flush()
    if matrix is not None:
        result.vectors = matrix[:embedded]  # a view: contiguous rows, no copy
    return result


# ------------------------------------------------------------------------------------------------------- dedup
@dataclass
class DedupResult:
    """What ``dedup`` did: the split's new entry, counts, where the report went, and dedup.json's content."""

    entry: dict
    samples: int
    exact_removed: int
    near_removed: int
    groups: int
    report_dir: Path
    stats: dict


def dedup_dataset(
    src: Path,
    out: Path,
    split: str = "train",
    model: str | Path | None = None,
    threshold: float | None = None,
    keep: str = "first",
    scores: Path | None = None,
    index: str = "flat",
    nlist: int | None = None,
    nprobe: int = DEFAULT_NPROBE,
    batch_size: int = 256,
    report: Path | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    progress: bool = True,
    pixels: bool = False,
) -> DedupResult:
    """Write ``src`` to ``out`` with one copy of each duplicate group of ``split`` (see the module doc); near
    duplicates under ``model``'s embedding or, with ``pixels``, the pixel descriptor; ``threshold`` defaults to
    0.95 for a model, 0.998 for pixels.

    Raises:
        DataToolsError: a bad option, a model that is not image-text, a scores table that does not match the split.
    """
    from data_tools import pixels as pixel_descriptor
    from data_tools.curate import Scorer

    if model is not None and pixels:
        raise DataToolsError("give --model or --pixels for near duplicates, not both")
    if threshold is None:
        threshold = pixel_descriptor.THRESHOLD if pixels else DEFAULT_THRESHOLD
    if keep not in ("first", "highest-score"):
        raise DataToolsError(f"--keep must be first or highest-score, got {keep!r}")
    if (keep == "highest-score") != (scores is not None):
        raise DataToolsError("--keep highest-score and --scores PARQUET go together")
    if not -1 <= threshold <= 1:
        raise DataToolsError(f"--threshold is a cosine similarity in [-1, 1], got {threshold}")
    if index not in ("flat", "ivf"):
        raise DataToolsError(f"--index must be flat or ivf, got {index!r}")
    if out.resolve() == src.resolve():
        raise DataToolsError("--out must differ from --src")
    table_ids, table_values = read_scores(scores, "score") if scores is not None else ([], [])
    if model is not None or pixels:
        import_faiss()  # before the slow parts
    scorer = Scorer(model, device) if model is not None else pixel_descriptor.PixelDescriptor() if pixels else None
    data = _scan_for_dedup(src, split, scorer, batch_size, progress)
    ids = data.scan.ids
    n = len(ids)
    score_of = {}
    if scores is not None:
        score_of = dict(zip(ids, align_scores(data.scan, table_ids, table_values, scores, split), strict=True))

    groups, nearest = _join(data, threshold, index, nlist, nprobe, progress)

    def rank(i: int) -> tuple:
        if keep == "first":
            return ids[i]
        value = score_of.get(ids[i])
        return (value is None, -(value or 0.0), *ids[i])

    members: dict[int, list[int]] = {}
    for i in range(n):
        root = groups.find(i)
        if groups.size[root] > 1:
            members.setdefault(root, []).append(i)
    table = _duplicate_rows(data, [sorted(m, key=rank) for m in members.values()])
    drop = {(s, k) for s, k, kept in zip(table["shard"], table["key"], table["kept"], strict=True) if not kept}
    pairs = _pairs_to_show(table)
    meta = dataset_meta(src)
    name = f"{meta.get('name', src.name)}-dedup"
    entry, files = write_selection(
        src, out, split, data.scan, drop, name, overwrite, [s for p in pairs for s in p[:2]], progress
    )
    _write_duplicates(table, out / DUPLICATES_PARQUET)

    near_by = str(model) if model is not None else "pixels" if pixels else None
    options = {"model": near_by, "threshold": threshold, "index": index, "nprobe": nprobe, "keep": keep}
    stats = _dedup_stats(src, split, options, data, table, len(drop), nearest)
    report_dir = report or out / REPORT_DIR
    report_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(report_dir / DEDUP_JSON, stats)
    _dedup_plots(report_dir, nearest, threshold, stats, table, pairs, files)
    atomic_write_bytes(report_dir / "report.md", _dedup_markdown(stats).encode("utf-8"))
    return DedupResult(entry, n, stats["exact_removed"], stats["near_removed"], stats["groups"], report_dir, stats)


def _dedup_stats(src: Path, split: str, options: dict, data: DedupScan, table: dict, removed: int, nearest) -> dict:
    model = options["model"]
    exact = sum(kind == "exact" for kind in table["kind"])
    n = len(data.scan.ids)
    return {
        "src": str(src),
        "split": split,
        "model": model,
        "threshold": options["threshold"] if model is not None else None,
        "index": options["index"] if model is not None else None,
        "nprobe": options["nprobe"] if model is not None and options["index"] == "ivf" else None,
        "keep": options["keep"],
        "samples": n,
        "unreadable_shard_ends": len(data.scan.broken),
        "embedded": 0 if data.vectors is None else len(data.vectors),
        "kept": n - removed,
        "groups": len(set(table["group"])),
        "exact_removed": exact,
        "near_removed": removed - exact,
        # joined to their group through a chain, further from the kept copy than the threshold
        "near_removed_below_threshold": sum(
            kind == "near" and sim is not None and sim < options["threshold"]
            for kind, sim in zip(table["kind"], table["similarity"], strict=True)
        ),
        "nearest_similarity_quantiles": _quantiles(nearest),
    }


def _join(
    data: DedupScan, threshold: float, index: str, nlist: int | None, nprobe: int, progress: bool = False
) -> tuple[UnionFind, Any]:
    """Samples joined by equal image hashes and, with embeddings, by pairs above the threshold; and each embedded
    sample's nearest-neighbour similarity (None without embeddings)."""
    import numpy as np

    groups = UnionFind(len(data.scan.ids))
    by_hash: dict[bytes, int] = {}
    for i, digest in enumerate(data.digests):
        if digest is not None:
            groups.union(by_hash.setdefault(digest, i), i)
    if data.vectors is None or len(data.vectors) < 2:
        return groups, None
    sample_of_row = np.flatnonzero(np.asarray(data.rows) >= 0)  # rows were filled in sample order
    if data.pixels:
        rows_i, rows_j, _, nearest = _pixel_pairs(data.vectors, threshold, index, nlist, nprobe, progress)
    else:
        index_ = build_index(data.vectors, index, nlist, nprobe)
        rows_i, rows_j, _, nearest = search_pairs(index_, data.vectors, threshold)
    for a, b in zip(sample_of_row[rows_i].tolist(), sample_of_row[rows_j].tolist(), strict=True):
        groups.union(a, b)
    return groups, nearest


def _pixel_pairs(thumbs, threshold: float, index: str, nlist: int | None, nprobe: int, progress: bool = False):
    """Pairs of thumbnails whose pixel similarity (the best over the transform grid, either side) is ≥ threshold,
    as :func:`search_pairs` returns them: (i, j, similarity, nearest); ``nearest`` is the best any of a
    thumbnail's own views reaches against another thumbnail."""
    import numpy as np

    from data_tools import pixels

    base = pixels.descriptors(thumbs)
    search = build_index(base, index, nlist, nprobe)
    n = len(thumbs)
    keys, sims, nearest = [], [], np.full(n, -np.inf, dtype=np.float32)
    for t in tqdm(pixels.transforms(), desc="pixel search", unit="view", disable=not progress, file=sys.stderr):
        queries = None if t is None else pixels.descriptors(thumbs, t)
        i, j, sim, near = search_pairs(search, base, threshold, queries=queries)
        keys.append(i * n + j)
        sims.append(sim)
        nearest = np.fmax(nearest, near)  # NaN (a lone row) loses to any number
    keys, sims = np.concatenate(keys), np.concatenate(sims)
    order = np.lexsort((-sims, keys))  # by pair, its best similarity first
    keys, sims = keys[order], sims[order]
    first = np.ones(len(keys), dtype=bool)
    first[1:] = keys[1:] != keys[:-1]
    nearest[~np.isfinite(nearest)] = np.nan
    return keys[first] // n, keys[first] % n, sims[first], nearest


def _pairs_to_show(table: dict[str, list]) -> list[tuple[tuple[str, str], tuple[str, str], int]]:
    """(removed copy, kept copy, row) for the grid: the near pairs least similar to the kept copy, then exact ones."""
    near = [i for i, kind in enumerate(table["kind"]) if kind == "near"]
    shown = sorted(near, key=lambda i: table["similarity"][i] if table["similarity"][i] is not None else -2)
    shown = shown[:GRID_PAIRS]
    shown += [i for i, kind in enumerate(table["kind"]) if kind == "exact"][: GRID_PAIRS - len(shown)]
    kept_of = {
        group: (shard, key)
        for group, shard, key, kept in zip(table["group"], table["shard"], table["key"], table["kept"], strict=True)
        if kept
    }
    return [((table["shard"][i], table["key"][i]), kept_of[table["group"][i]], i) for i in shown]


def _duplicate_rows(data: DedupScan, groups: list[list[int]]) -> dict[str, list]:
    """duplicates.parquet's columns for groups given as member lists, the member to keep first; groups numbered
    in (shard, key) order of their kept copy."""
    from data_tools.pixels import similarity as pixel_similarity

    rows: dict[str, list] = {"key": [], "shard": [], "group": [], "kept": [], "kind": [], "similarity": []}
    vectors = data.vectors
    for number, group in enumerate(sorted(groups, key=lambda g: data.scan.ids[g[0]])):
        keeper = group[0]
        for i in sorted(group, key=lambda i: data.scan.ids[i]):
            shard, key = data.scan.ids[i]
            exact = i != keeper and data.digests[i] is not None and data.digests[i] == data.digests[keeper]
            both = vectors is not None and data.rows[i] >= 0 and data.rows[keeper] >= 0
            if i == keeper:
                similarity = None
            elif both and data.pixels:
                similarity = pixel_similarity(vectors[data.rows[i]], vectors[data.rows[keeper]])
            elif both:
                similarity = float(vectors[data.rows[i]] @ vectors[data.rows[keeper]])
            else:
                similarity = 1.0 if exact else None
            rows["key"].append(key)
            rows["shard"].append(shard)
            rows["group"].append(number)
            rows["kept"].append(i == keeper)
            rows["kind"].append(None if i == keeper else "exact" if exact else "near")
            rows["similarity"].append(similarity)
    return rows


def _write_duplicates(rows: dict[str, list], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [("key", pa.string()), ("shard", pa.string()), ("group", pa.int64()), ("kept", pa.bool_()),
         ("kind", pa.string()), ("similarity", pa.float64())]
    )  # fmt: skip
    tmp = path.with_name(path.name + TMP_SUFFIX)
    pq.write_table(pa.table(rows, schema=schema), tmp)
    os.replace(tmp, path)


def _quantiles(nearest) -> dict[str, float] | None:
    import numpy as np

    if nearest is None or not np.isfinite(nearest).any():
        return None
    finite = nearest[np.isfinite(nearest)]
    return {**{f"q{q:g}": float(np.quantile(finite, q / 100)) for q in (1, 5, 50, 95, 99)}, "max": float(finite.max())}


def _dedup_markdown(stats: dict) -> str:
    lines = [
        f"# Curation report: dedup {stats['split']}",
        "",
        f"- source: `{stats['src']}`; keep rule: **{stats['keep']}**",
        f"- samples: {stats['samples']}, kept: {stats['kept']}, groups of duplicates: {stats['groups']}",
        f"- exact duplicates removed (same sha256 of the image bytes): {stats['exact_removed']}",
    ]
    if stats["model"] is None:
        lines.append("- no `--model` or `--pixels`: only exact duplicates were looked for")
    else:
        pixel = stats["model"] == "pixels"
        under = "the pixel descriptor (best over zooms and shifts)" if pixel else f"`{stats['model']}`"
        lines += [
            f"- near duplicates removed (similarity ≥ {stats['threshold']:g} under {under}, "
            f"{stats['index']} index): {stats['near_removed']}",
            f"- of those, joined through a chain and less similar than the threshold to the copy kept: "
            f"{stats['near_removed_below_threshold']}",
            f"- samples embedded: {stats['embedded']} (the others take part in exact matching only)",
        ]
        q = stats["nearest_similarity_quantiles"]
        if q:
            text = ", ".join(f"{k} {v:.4f}" for k, v in q.items())
            lines += ["", f"Nearest-neighbour similarity quantiles: {text}", "", "![nn](nn_similarity_hist.png)"]
    lines += ["", "Removed copies (right) next to the copy kept (left):", "", "![pairs](grid_duplicates.png)", ""]
    return "\n".join(lines)


def _dedup_plots(report_dir: Path, nearest, threshold: float, stats: dict, table, pairs, files) -> None:
    import numpy as np

    if nearest is not None and np.isfinite(nearest).any():
        fig, axes = new_figure(1, 1, (7, 3.5))
        ax = axes[0, 0]
        ax.hist(nearest[np.isfinite(nearest)], bins=60, color="tab:blue", log=True)
        ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:g}")
        ax.set_title(f"{stats['split']}: nearest-neighbour cosine similarity")
        ax.set_xlabel("cosine similarity to the nearest other sample")
        ax.set_ylabel("samples")
        ax.legend(fontsize="small")
        fig.savefig(report_dir / "nn_similarity_hist.png", dpi=100)
    tiles: list[tuple[bytes | None, str]] = []
    for removed, kept, row in pairs:
        sim = table["similarity"][row]
        tiles.append((image_of(files.get(kept, {})), f"kept\n{kept[1]}"))
        text = "–" if sim is None else f"{sim:.4f}"
        tiles.append((image_of(files.get(removed, {})), f"{table['kind'][row]} {text}\n{removed[1]}"))
    draw_grid(tiles, report_dir / "grid_duplicates.png", f"{stats['split']}: duplicate pairs (kept | removed)")


__all__ = [
    "DEDUP_JSON",
    "DEFAULT_THRESHOLD",
    "DedupResult",
    "UnionFind",
    "build_index",
    "content_hash",
    "dedup_dataset",
    "search_pairs",
]
