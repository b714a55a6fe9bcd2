"""Curation: ``filter`` — keep the samples of one split a rule selects from a ``score`` table, and say what it did.

Rules (exactly one), on the column ``--column`` (default ``score``) of the table, one value per sample:

- ``--min-score X``: keep the samples whose value is at least X.
- ``--top-fraction F``: keep the ``round(F × n)`` highest-valued of the ``n`` readable samples; equal values are
  ordered by key, so the choice is deterministic.
- ``--top-fraction F --per class``: the same within each json ``label`` class.
- ``--top-fraction F --per caption-cluster --clusters K --model MODEL``: the same within each of K caption clusters.
  The captions are embedded by the scoring model's own text tower (each distinct caption once) and clustered by
  spherical k-means (faiss, seed 0); clusters on exact caption text would make every template wording of a class
  its own stratum, and a column of stored text embeddings would need a second writer of the scores table.

A sample whose value is null (NaN included) or whose ``bad_reason`` is set, and a sample a cut-off shard breaks
inside, is always removed and counted as ``unreadable``. The table must name every sample of the split, and only
those, by ``(shard, key)``: a table of another dataset is refused instead of half applied.

The output is a data_tools dataset dir: the kept samples copied byte for byte under their own keys, each into the
shard of the same name as its source shard (so a ``(shard, key)`` still joins the scores table; a shard nothing
was kept of is written empty), the other splits and files copied unchanged, ``sizes.json`` and ``dataset.json``
rewritten. The split is read twice: once for labels / captions / the ``caption_replaced`` flags, once to copy.

When it is known which captions were replaced (``--corrupted corrupted.parquet``, else a ``caption_replaced`` json
field on every sample, as ``corrupt-captions`` writes), the report measures the filter: replaced pairs removed
(unreadable ones included) and clean pairs kept, each as a count and a share.

The report (``--report DIR``, default ``OUT/curation/``): ``report.md``, ``filter.json`` (the same numbers),
``score_hist.png`` (kept vs removed, the threshold; replaced vs clean below when known), ``grid_lowest_kept.png``
and ``grid_highest_removed.png`` (4 × 4 image tiles titled with caption and value).
"""

from __future__ import annotations

import io
import json
import math
import sys
import textwrap
from collections import Counter, defaultdict
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from data_tools.curate import (
    CORRUPTED_PARQUET,
    ShardCopyWriter,
    copy_dataset_files,
    dataset_meta,
    split_shards,
)
from data_tools.shards import (
    DATASET_JSON,
    DataToolsError,
    atomic_write_bytes,
    atomic_write_json,
    finish_split,
    prepare_split_dir,
)
from data_tools.verify import IMAGE_EXTS, BrokenTarError, iter_tar_samples

REPORT_DIR = "curation"
FILTER_JSON = "filter.json"
DUPLICATES_PARQUET = "duplicates.parquet"
GRID_TILES = 16  # 4 × 4
# Files of a source dir that describe the source's own curation, not the copy: never copied into OUT.
CURATION_FILES = {CORRUPTED_PARQUET, DUPLICATES_PARQUET, REPORT_DIR}
SampleId = tuple[str, str]  # (shard file name, key)


# --------------------------------------------------------------------------------------- reading and writing
@dataclass
class SplitScan:
    """What the first read of a split found, one entry per complete sample, in shard order.

    Attributes:
        ids: ``(shard, key)`` of every complete sample.
        labels: json ``label`` (None when absent).
        replaced: json ``caption_replaced`` (None when absent).
        captions: caption text, when asked for (else empty).
        broken: ``(shard, key or None)`` of the sample a cut-off or corrupt shard broke inside.
        shards: the split's shard paths.
    """

    ids: list[SampleId] = field(default_factory=list)
    labels: list[int | None] = field(default_factory=list)
    replaced: list[bool | None] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    broken: list[tuple[str, str | None]] = field(default_factory=list)
    shards: list[Path] = field(default_factory=list)


def _json_fields(files: dict[str, bytes]) -> tuple[int | None, bool | None]:
    try:
        meta = json.loads(files["json"])
    except (KeyError, ValueError):
        return None, None
    if not isinstance(meta, dict):
        return None, None
    label = meta.get("label")
    replaced = meta.get("caption_replaced")
    return (
        int(label) if isinstance(label, int | float) and not isinstance(label, bool) else None,
        replaced if isinstance(replaced, bool) else None,
    )


def shard_samples(path: Path):
    """Yield ``(key, files)`` of every complete sample of a shard, then ``(key or None, None)`` once if the shard
    breaks (the samples before the break are yielded)."""
    try:
        yield from iter_tar_samples(path)
    except (BrokenTarError, OSError) as exc:
        yield getattr(exc, "key", None), None


def iter_split(shards: list[Path], desc: str, progress: bool):
    """:func:`shard_samples` of every shard as ``(shard name, key, files)``, with a progress bar over the shards."""
    for path in tqdm(shards, desc=desc, unit="shard", file=sys.stderr, disable=not progress):
        for key, files in shard_samples(path):
            yield path.name, key, files


def scan_split(src: Path, split: str, captions: bool = False, progress: bool = True) -> tuple[dict, SplitScan]:
    """(dataset.json, the split's metadata) of a data_tools dataset dir, reading every shard once."""
    meta = dataset_meta(src)
    scan = SplitScan(shards=split_shards(src, meta, split))
    for shard, key, files in iter_split(scan.shards, f"reading {split}", progress):
        if files is None:
            scan.broken.append((shard, key))
            continue
        label, replaced = _json_fields(files)
        scan.ids.append((shard, key))
        scan.labels.append(label)
        scan.replaced.append(replaced)
        if captions:
            scan.captions.append(files.get("txt", b"").decode("utf-8", errors="replace").strip())
    return meta, scan


def write_selection(
    src: Path,
    out: Path,
    split: str,
    scan: SplitScan,
    drop: set[SampleId],
    name: str,
    overwrite: bool = False,
    collect: Iterable[SampleId] = (),
    progress: bool = True,
) -> tuple[dict, dict[SampleId, dict[str, bytes]]]:
    """Copy ``src`` to ``out`` without the samples of ``split`` in ``drop`` (see the module doc for the layout).

    Args:
        src: Source dataset dir.
        out: Dataset dir to write (must differ from ``src``).
        split: The split to thin out; every other split is copied unchanged.
        scan: :func:`scan_split`'s result for ``src`` / ``split``.
        drop: ``(shard, key)`` of the samples left out.
        name: The new dataset name in dataset.json.
        overwrite: Replace files and shards already in ``out``.
        collect: ``(shard, key)`` of samples whose files to return (for the report's image grids).
        progress: Show a progress bar over the shards.

    Returns:
        (the split's new dataset.json entry, ``{(shard, key): files}`` of the collected samples).
    """
    if out.resolve() == src.resolve():
        raise DataToolsError("--out must differ from --src")
    meta = dataset_meta(src)
    copy_dataset_files(src, out, {split, *CURATION_FILES}, overwrite)
    split_dir = prepare_split_dir(out, split, overwrite)
    wanted = set(collect)
    found: dict[SampleId, dict[str, bytes]] = {}
    # Shard boundaries follow the source's, so no source shard can overflow its copy.
    capacity = max(Counter(shard for shard, _ in scan.ids).values(), default=1)
    with ShardCopyWriter(split_dir, split, capacity) as writer:
        for path in tqdm(scan.shards, desc=f"writing {split}", unit="shard", file=sys.stderr, disable=not progress):
            writer.next_shard()  # one output shard per source shard, empty ones included
            for key, files in shard_samples(path):
                if files is None:
                    continue
                if (path.name, key) in wanted:
                    found[(path.name, key)] = files
                if (path.name, key) not in drop:
                    writer.write({"__key__": key, **files})
    atomic_write_json(out / DATASET_JSON, {**meta, "name": name})
    return finish_split(out, split, writer.sizes, name), found


# ------------------------------------------------------------------------------------------------ the rules
@dataclass
class FilterRule:
    """One selection rule (see the module doc): ``min_score`` or ``top_fraction`` (optionally ``per`` group)."""

    min_score: float | None = None
    top_fraction: float | None = None
    per: str | None = None  # None, "class" or "caption-cluster"
    clusters: int | None = None
    column: str = "score"

    def check(self) -> None:
        """Raise a one-line DataToolsError for a rule that is not exactly one of the documented ones."""
        if (self.min_score is None) == (self.top_fraction is None):
            raise DataToolsError("give exactly one rule: --min-score X or --top-fraction F")
        if self.top_fraction is not None and not 0 < self.top_fraction <= 1:
            raise DataToolsError(f"--top-fraction must be in (0, 1], got {self.top_fraction}")
        if self.per is not None and self.top_fraction is None:
            raise DataToolsError("--per goes with --top-fraction")
        if self.per not in (None, "class", "caption-cluster"):
            raise DataToolsError(f"--per must be class or caption-cluster, got {self.per!r}")
        if self.per == "caption-cluster" and (self.clusters is None or self.clusters < 1):
            raise DataToolsError("--per caption-cluster needs --clusters K (K >= 1)")

    def describe(self) -> str:
        if self.min_score is not None:
            return f"{self.column} >= {self.min_score:g}"
        per = "" if self.per is None else f" per {self.per}" + (f" (K={self.clusters})" if self.clusters else "")
        return f"top {self.top_fraction:g} by {self.column}{per}"


def select_kept(
    values: list[float | None], keys: list[str], rule: FilterRule, groups: list[Hashable] | None = None
) -> set[int]:
    """Indices of the samples ``rule`` keeps; a None value is never kept.

    Args:
        values: The rule's column, one value (or None) per sample.
        keys: The samples' keys: the tie-break among equal values (smaller key first).
        rule: A checked :class:`FilterRule`.
        groups: With ``rule.per``, each sample's group (class or cluster); the fraction applies within each.
    """
    readable = [i for i, v in enumerate(values) if v is not None]
    if rule.min_score is not None:
        return {i for i in readable if values[i] >= rule.min_score}
    by_group: dict[Hashable, list[int]] = defaultdict(list)
    for i in readable:
        by_group[None if groups is None else groups[i]].append(i)
    kept: set[int] = set()
    for members in by_group.values():
        members.sort(key=lambda i: (-values[i], keys[i]))
        kept.update(members[: round(rule.top_fraction * len(members))])
    return kept


def read_scores(path: Path, column: str) -> tuple[list[SampleId], list[float | None]]:
    """((shard, key) of every row, the row's value of ``column`` or None when null, NaN or ``bad_reason`` set).

    Raises:
        DataToolsError: The file does not read, a needed column is missing, or ``column`` is not numeric.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as exc:
        raise DataToolsError(f"cannot read scores table {path}: {exc}") from None
    present = list(schema.names)
    for needed in ("shard", "key", column):
        if needed not in present:
            raise DataToolsError(f"scores table {path} has no column {needed!r} (columns: {', '.join(present)})")
    kind = schema.field(column).type
    if not (pa.types.is_floating(kind) or pa.types.is_integer(kind)):
        raise DataToolsError(f"column {column!r} of {path} is {kind}, not a number")
    names = ["shard", "key", column] + (["bad_reason"] if "bad_reason" in present and column != "bad_reason" else [])
    table = pq.read_table(path, columns=names).to_pydict()
    bad = table.get("bad_reason", [None] * len(table["key"]))
    values = [
        None if v is None or (isinstance(v, float) and math.isnan(v)) or reason is not None else float(v)
        for v, reason in zip(table[column], bad, strict=True)
    ]
    return list(zip(table["shard"], table["key"], strict=True)), values


def _example(ids: Iterable[tuple[str, str | None]]) -> str:
    shard, key = sorted(ids, key=str)[0]
    return f"{shard}/{key}"


def align_scores(scan: SplitScan, ids: list[SampleId], values: list[float | None], path: Path, split: str):
    """The table's value for each of ``scan``'s samples, in scan order.

    Raises:
        DataToolsError: The table names a sample twice, misses samples of the split, or names samples not in it.
    """
    table: dict[tuple[str, str | None], float | None] = {}
    for sample, value in zip(ids, values, strict=True):
        if sample in table:
            raise DataToolsError(f"scores table {path} names {sample[0]}/{sample[1]} twice")
        table[sample] = value
    missing = [s for s in scan.ids if s not in table]
    if missing:
        raise DataToolsError(
            f"scores table {path} misses {len(missing)} samples of split {split}, e.g. {_example(missing)} "
            "(score this dataset again: python -m data_tools score)"
        )
    extra = set(table) - set(scan.ids) - set(scan.broken)
    if extra:
        raise DataToolsError(
            f"scores table {path} names {len(extra)} samples not in split {split}, e.g. {_example(extra)} "
            "(scores of another dataset?)"
        )
    return [table[s] for s in scan.ids]


def read_corrupted(path: Path, scan: SplitScan) -> list[bool]:
    """Each sample's ``replaced`` flag from a ``corrupted.parquet``, matched by key.

    Raises:
        DataToolsError: The file lacks ``key`` / ``replaced`` or misses samples of the split.
    """
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path).to_pydict()
    except OSError as exc:
        raise DataToolsError(f"cannot read {path}: {exc}") from None
    if "key" not in table or "replaced" not in table:
        raise DataToolsError(f"{path} has no key / replaced columns (columns: {', '.join(table)})")
    flags = dict(zip(table["key"], table["replaced"], strict=True))
    missing = [(s, k) for s, k in scan.ids if k not in flags]
    if missing:
        raise DataToolsError(f"{path} misses {len(missing)} samples of the split, e.g. {_example(missing)}")
    return [bool(flags[k]) for _, k in scan.ids]


def import_faiss():
    """The faiss module, or a one-line DataToolsError saying how to install it."""
    try:
        import faiss
    except ImportError:
        raise DataToolsError("faiss is not installed: pip install faiss-cpu (or mm-ptft[web])") from None
    return faiss


def caption_clusters(model: str | Path, captions: list[str], k: int, device: str = "cpu") -> list[int]:
    """Each caption's cluster: spherical k-means (faiss, seed 0) on the model's text embeddings of the distinct
    captions.

    Raises:
        DataToolsError: fewer distinct captions than clusters, or a model that cannot embed text.
    """
    import numpy as np

    from data_tools.curate import Scorer

    faiss = import_faiss()
    distinct = sorted(set(captions))
    if len(distinct) < k:
        raise DataToolsError(f"--clusters {k} is more than the {len(distinct)} distinct captions of the split")
    scorer = Scorer(model, device)
    vectors = np.concatenate([scorer.encode_texts(distinct[i : i + 256]) for i in range(0, len(distinct), 256)])
    # min_points_per_centroid=1: a few hundred captions in a handful of clusters is fine, no warning wanted
    kmeans = faiss.Kmeans(vectors.shape[1], k, niter=20, seed=0, spherical=True, min_points_per_centroid=1)
    kmeans.train(vectors)
    _, assign = kmeans.index.search(vectors, 1)  # (U, 1) nearest centroid
    cluster = dict(zip(distinct, assign[:, 0].tolist(), strict=True))
    return [cluster[c] for c in captions]


# ------------------------------------------------------------------------------------------------------ filter
@dataclass
class FilterResult:
    """What ``filter`` did: the split's new entry, counts, where the report went, and filter.json's content."""

    entry: dict
    kept: int
    removed: int
    unreadable: int
    report_dir: Path
    stats: dict


def filter_dataset(
    src: Path,
    scores: Path,
    out: Path,
    rule: FilterRule,
    split: str = "train",
    report: Path | None = None,
    corrupted: Path | None = None,
    model: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> FilterResult:
    """Write the samples of ``src``'s ``split`` that ``rule`` keeps (and everything else) to ``out``, and the report.

    Raises:
        DataToolsError: a bad rule, a scores table that does not match the split, a caption-cluster rule without a
            model; see the module doc.
    """
    rule.check()
    if rule.per == "caption-cluster":
        if model is None:
            raise DataToolsError("--per caption-cluster needs --model (its text tower embeds the captions)")
        import_faiss()  # before the slow parts
    if out.resolve() == src.resolve():
        raise DataToolsError("--out must differ from --src")
    ids, values = read_scores(scores, rule.column)  # before the slow read: a bad column fails at once
    meta, scan = scan_split(src, split, captions=rule.per == "caption-cluster", progress=progress)
    aligned = align_scores(scan, ids, values, scores, split)
    replaced = read_corrupted(corrupted, scan) if corrupted is not None else None
    if replaced is None and scan.ids and all(r is not None for r in scan.replaced):
        replaced = scan.replaced
    groups: list | None = None
    if rule.per == "class":
        unlabelled = [s for s, label in zip(scan.ids, scan.labels, strict=True) if label is None]
        if unlabelled:
            raise DataToolsError(f"--per class needs a json label on every sample; {_example(unlabelled)} has none")
        groups = scan.labels
    elif rule.per == "caption-cluster":
        groups = caption_clusters(model, scan.captions, rule.clusters)
    kept = select_kept(aligned, [k for _, k in scan.ids], rule, groups)

    drop = {s for i, s in enumerate(scan.ids) if i not in kept}
    readable = [i for i, v in enumerate(aligned) if v is not None]
    lowest_kept = sorted(kept, key=lambda i: (aligned[i], scan.ids[i][1]))[:GRID_TILES]
    highest_removed = sorted((i for i in readable if i not in kept), key=lambda i: (-aligned[i], scan.ids[i][1]))[
        :GRID_TILES
    ]
    name = f"{meta.get('name', src.name)}-filtered"
    entry, files = write_selection(
        src, out, split, scan, drop, name, overwrite, [scan.ids[i] for i in lowest_kept + highest_removed], progress
    )
    stats = _filter_stats(meta, split, scan, aligned, kept, rule, replaced, groups, src, scores)
    report_dir = report or out / REPORT_DIR
    report_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(report_dir / FILTER_JSON, stats)
    _filter_plots(report_dir, scan, aligned, kept, replaced, stats, files, lowest_kept, highest_removed)
    atomic_write_bytes(report_dir / "report.md", _filter_markdown(stats).encode("utf-8"))
    s = stats["splits"][split]
    return FilterResult(entry, s["kept"], s["removed"], s["unreadable"], report_dir, stats)


def _filter_stats(meta, split, scan, values, kept, rule, replaced, groups, src, scores) -> dict:
    classnames = meta.get("classnames") or []
    n = len(scan.ids)
    unreadable = sum(v is None for v in values) + len(scan.broken)
    splits = {
        name: {"samples": e.get("num_samples"), "kept": e.get("num_samples"), "removed": 0, "unreadable": 0}
        for name, e in meta.get("splits", {}).items()
        if name != split
    }
    splits[split] = {
        "samples": n + len(scan.broken),
        "kept": len(kept),
        "removed": n - len(kept) - sum(v is None for v in values),
        "unreadable": unreadable,
    }
    per_class: dict[str, dict[str, int]] = {}
    for i, label in enumerate(scan.labels):
        name = "unlabelled" if label is None else (classnames[label] if 0 <= label < len(classnames) else str(label))
        row = per_class.setdefault(name, {"kept": 0, "removed": 0, "unreadable": 0})
        row["kept" if i in kept else "unreadable" if values[i] is None else "removed"] += 1
    kept_values = [values[i] for i in kept]
    stats: dict[str, Any] = {
        "src": str(src),
        "scores": str(scores),
        "split": split,
        "rule": rule.describe(),
        "column": rule.column,
        "min_score": rule.min_score,
        "top_fraction": rule.top_fraction,
        "per": rule.per,
        "clusters": rule.clusters,
        # the value every kept sample reaches: the rule's threshold, or the lowest kept value for top-fraction
        "threshold": rule.min_score if rule.min_score is not None else (min(kept_values) if kept_values else None),
        "splits": dict(sorted(splits.items())),
        "per_class": dict(sorted(per_class.items())),
    }
    if groups is not None and rule.per == "caption-cluster":
        sizes = Counter(groups)
        kept_per = Counter(groups[i] for i in kept)
        stats["per_cluster"] = {str(c): {"samples": sizes[c], "kept": kept_per[c]} for c in sorted(sizes)}
    if replaced is not None:
        stats["replaced"] = _measure(replaced, kept)
    return stats


def _share(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _measure(replaced: list[bool], kept: set[int]) -> dict:
    total_replaced = sum(replaced)
    removed_replaced = sum(r and i not in kept for i, r in enumerate(replaced))
    total_clean = len(replaced) - total_replaced
    kept_clean = sum(not r and i in kept for i, r in enumerate(replaced))
    removed = len(replaced) - len(kept)
    return {
        "replaced": total_replaced,
        "replaced_removed": removed_replaced,
        "replaced_removed_share": _share(removed_replaced, total_replaced),
        "clean": total_clean,
        "clean_kept": kept_clean,
        "clean_kept_share": _share(kept_clean, total_clean),
        "removed_that_were_replaced_share": _share(removed_replaced, removed),
    }


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def _filter_markdown(stats: dict) -> str:
    lines = [
        f"# Curation report: filter {stats['split']}",
        "",
        f"- source: `{stats['src']}`, scores: `{stats['scores']}`",
        f"- rule: **{stats['rule']}**"
        + (f" (lowest kept value {stats['threshold']:.4f})" if stats["threshold"] is not None else ""),
        "- unreadable: a null value or a `bad_reason` in the table, or a sample a broken shard cut; always removed",
        "",
        "## Per split",
        "",
        "| split | samples | kept | removed | unreadable |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {name} | {s['samples']} | {s['kept']} | {s['removed']} | {s['unreadable']} |"
        for name, s in stats["splits"].items()
    ]
    lines += [
        "",
        f"## Per class ({stats['split']})",
        "",
        "| class | kept | removed | unreadable |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {c} | {r['kept']} | {r['removed']} | {r['unreadable']} |" for c, r in stats["per_class"].items()]
    if "per_cluster" in stats:
        lines += ["", "## Per caption cluster", "", "| cluster | samples | kept |", "|---|---:|---:|"]
        lines += [f"| {c} | {r['samples']} | {r['kept']} |" for c, r in stats["per_cluster"].items()]
    m = stats.get("replaced")
    if m is not None:
        lines += [
            "",
            "## Replaced captions (measured)",
            "",
            "| | count | of | share |",
            "|---|---:|---:|---:|",
            f"| replaced pairs removed | {m['replaced_removed']} | {m['replaced']} "
            f"| {_pct(m['replaced_removed_share'])} |",
            f"| clean pairs kept | {m['clean_kept']} | {m['clean']} | {_pct(m['clean_kept_share'])} |",
            "",
            f"Of the removed pairs, {_pct(m['removed_that_were_replaced_share'])} had a replaced caption.",
        ]
    lines += [
        "",
        "![scores](score_hist.png)",
        "",
        "Lowest-valued kept pairs: ![lowest kept](grid_lowest_kept.png)",
        "",
        "Highest-valued removed pairs: ![highest removed](grid_highest_removed.png)",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ plots
def new_figure(rows: int, cols: int, size: tuple[float, float], layout: str | None = "constrained"):
    """(figure, axes array) on its own Agg canvas: no pyplot state, no global backend switch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout=layout)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)


def draw_grid(tiles: list[tuple[bytes | None, str]], path: Path, title: str, cols: int = 4) -> None:
    """Save image tiles ``(encoded image bytes, tile title)`` as a grid PNG; an empty list gives a note instead."""
    import numpy as np
    from PIL import Image

    rows = max(1, math.ceil(len(tiles) / cols))
    height = 2.3 * rows + 0.9
    fig, axes = new_figure(rows, cols, (2.0 * cols, height), layout=None)  # a fixed layout: 5× faster to draw
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=1 - 0.95 / height, wspace=0.1, hspace=0.6)
    fig.suptitle(title, fontsize=10, y=1 - 0.1 / height, va="top")
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= len(tiles):
            continue
        data, label = tiles[i]
        try:
            image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) if data else None
        except Exception:  # PIL raises many types for corrupt data; the tile says so instead
            image = None
        if image is not None:
            ax.imshow(image, interpolation="nearest")
        ax.set_title(label if image is not None else f"(undecodable)\n{label}", fontsize=7)
    if not tiles:
        axes.flat[0].text(0.5, 0.5, "none", ha="center", va="center")
    fig.savefig(path, dpi=100)


def image_of(files: dict[str, bytes]) -> bytes | None:
    """The sample's encoded image (the first image field by name), or None."""
    return next((files[e] for e in sorted(files) if e in IMAGE_EXTS), None)


def tile_title(files: dict[str, bytes], value_text: str, width: int = 28) -> str:
    """The sample's caption on at most two lines of ``width`` characters (cut with "…"), then ``value_text``."""
    caption = files.get("txt", b"").decode("utf-8", errors="replace").strip()
    lines = textwrap.wrap(caption, width) or [""]
    if len(lines) > 2:
        lines = [lines[0], lines[1][: width - 1] + "…"]
    return "\n".join([*lines, value_text])


def _filter_plots(report_dir, scan, values, kept, replaced, stats, files, lowest_kept, highest_removed) -> None:
    import numpy as np

    readable = [i for i, v in enumerate(values) if v is not None]
    all_values = np.array([values[i] for i in readable], dtype=float)
    bins = np.histogram_bin_edges(all_values, bins=40) if len(all_values) else 10
    fig, axes = new_figure(2 if replaced is not None else 1, 1, (7, 6 if replaced is not None else 3.5))
    ax = axes[0, 0]
    ax.hist([values[i] for i in readable if i in kept], bins=bins, color="tab:blue", alpha=0.7, label="kept")
    ax.hist([values[i] for i in readable if i not in kept], bins=bins, color="tab:red", alpha=0.7, label="removed")
    if stats["threshold"] is not None and stats["per"] is None:
        ax.axvline(stats["threshold"], color="black", linestyle="--", label=f"threshold {stats['threshold']:.4f}")
    ax.set_title(f"{stats['split']}: {stats['rule']}")
    ax.set_xlabel(stats["column"])
    ax.set_ylabel("samples")
    ax.legend(fontsize="small")
    if replaced is not None:
        ax = axes[1, 0]
        ax.hist([values[i] for i in readable if not replaced[i]], bins=bins, color="tab:green", alpha=0.7,
                label="clean caption")  # fmt: skip
        ax.hist([values[i] for i in readable if replaced[i]], bins=bins, color="tab:orange", alpha=0.7,
                label="replaced caption")  # fmt: skip
        ax.set_xlabel(stats["column"])
        ax.set_ylabel("samples")
        ax.legend(fontsize="small")
    fig.savefig(report_dir / "score_hist.png", dpi=100)

    for indices, name, title in (
        (lowest_kept, "grid_lowest_kept.png", "lowest-valued kept"),
        (highest_removed, "grid_highest_removed.png", "highest-valued removed"),
    ):
        tiles = []
        for i in indices:
            sample = files.get(scan.ids[i], {})
            tiles.append((image_of(sample), tile_title(sample, f"{values[i]:.4f}")))
        draw_grid(tiles, report_dir / name, f"{stats['split']}: {title} ({stats['column']})")


__all__ = [
    "FILTER_JSON",
    "REPORT_DIR",
    "FilterResult",
    "FilterRule",
    "SplitScan",
    "align_scores",
    "caption_clusters",
    "draw_grid",
    "filter_dataset",
    "read_scores",
    "scan_split",
    "select_kept",
    "write_selection",
]
