"""Recall of ``data_tools dedup`` on injected near-duplicates, and its false removals on the rest of a real split.

    python bench/dedup_recall.py --src data/fmnist (--model runs/pretrain-fmnist-cnn-3ep | --pixels) \
        --work /tmp/dedup-60k [--per-kind 100] [--thresholds 0.97,0.98,0.99,0.995] [--write 0.99] \
        [--out bench/results/x.json]

A copy of ``--src`` gets one more train shard of injected copies: ``--per-kind`` distinct originals for each kind
of :data:`KINDS` (the same image byte for byte, re-encoded as PNG at another compression, as JPEG q90, resized up
and back, resized down to 13/14 of the size and kept there, cropped by 1 px all round, cropped by 2 px off two
sides — the crops resized back to the source size). The copies sit after every original in ``(shard, key)`` order, so
``dedup``'s keep-first rule keeps the original. The split is read and embedded once (dedup's own reader and
model), the pairs are searched once at the lowest threshold, and each threshold's groups are formed as ``dedup``
forms them (union-find over exact-hash and near pairs): per threshold, the share of the injected copies removed
(per kind) and the share of the originals removed ("false removals" — most are images of the source that are
themselves near-identical, see the printed pairs). ``--write T`` then runs the real ``dedup`` at threshold T into
``WORK/dedup`` (its report and ``duplicates.parquet``) and checks that it removed what the table says.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KINDS = ("exact", "png", "jpeg", "resize-up", "resize-down", "crop1", "crop2")


def make_copy(data: bytes, kind: str) -> tuple[str, bytes]:
    """(image field, bytes) of one copy of kind ``kind`` of an encoded image (see the module doc)."""
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.load()
    w, h = image.size
    bicubic = Image.Resampling.BICUBIC

    def png(im) -> bytes:
        buf = io.BytesIO()
        im.save(buf, "PNG", compress_level=1)
        return buf.getvalue()

    if kind == "exact":  # the same bytes under the source's own field
        return ("jpg" if image.format == "JPEG" else "png"), data
    if kind == "png":  # same pixels, other bytes
        return "png", png(image)
    if kind == "jpeg":
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=90)
        return "jpg", buf.getvalue()
    if kind == "resize-up":
        return "png", png(image.resize((w * 8 // 7, h * 8 // 7), bicubic).resize((w, h), bicubic))
    if kind == "resize-down":
        return "png", png(image.resize((w * 13 // 14, h * 13 // 14), bicubic))
    if kind == "crop1":
        return "png", png(image.crop((1, 1, w - 1, h - 1)).resize((w, h), bicubic))
    if kind == "crop2":
        return "png", png(image.crop((2, 0, w, h - 2)).resize((w, h), bicubic))
    raise ValueError(f"unknown copy kind {kind!r} (kinds: {', '.join(KINDS)})")


def inject_copies(src: Path, out: Path, per_kind: int, split: str = "train", offset: int = 0) -> dict[str, str]:
    """Copy dataset ``src`` to ``out`` and append one shard of injected copies to ``split``; the originals are
    every stride-th sample from ``offset`` (another offset: another set of originals, to check a threshold chosen
    on one set).

    Returns:
        {copy key: its original's key}; copy keys are ``dup-<kind>-NNNN``.
    """
    from data_tools.curate import dataset_meta, split_shards
    from data_tools.filter import image_of
    from data_tools.verify import iter_tar_samples

    meta = dataset_meta(src)
    shards = split_shards(src, meta, split)
    total = meta["splits"][split]["num_samples"]
    wanted = len(KINDS) * per_kind
    if wanted > total:
        raise ValueError(f"{wanted} copies asked of a split of {total} samples")
    stride = total // wanted
    picked: list[tuple[str, dict[str, bytes]]] = []
    index = 0
    for path in shards:  # every stride-th sample, spread over the whole split
        for key, files in iter_tar_samples(path):
            if index % stride == offset % stride and len(picked) < wanted and image_of(files) is not None:
                picked.append((key, files))
            index += 1
    shutil.copytree(src, out)
    number = len(shards)
    name = f"shard-{number:06d}.tar"
    source: dict[str, str] = {}
    with tarfile.open(out / split / name, "w") as tar:
        for n, (original, files) in enumerate(picked):
            kind = KINDS[n // per_kind]
            key = f"dup-{kind}-{n % per_kind:04d}"
            ext, image = make_copy(image_of(files), kind)
            source[key] = original
            for field, data in ((ext, image), *((f, files[f]) for f in ("txt", "json") if f in files)):
                info = tarfile.TarInfo(f"{key}.{field}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    sizes_path = out / split / "sizes.json"
    sizes = json.loads(sizes_path.read_text()) if sizes_path.is_file() else {}
    sizes_path.write_text(json.dumps({**sizes, name: len(source)}, indent=2) + "\n")
    first = shards[0].name.split("-")[-1].split(".")[0]
    meta["splits"][split] = {
        **meta["splits"][split],
        "pattern": f"{split}/shard-{{{first}..{number:06d}}}.tar",
        "num_samples": total + len(source),
        "num_shards": number + 1,
    }
    (out / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    return source


def measure(removed: set[str], keys: list[str], source: dict[str, str]) -> dict:
    """Share of injected copies removed (all non-exact kinds together, and per kind) and of originals removed."""
    originals = [k for k in keys if k not in source]
    found = {kind: [k in removed for k in source if k.startswith(f"dup-{kind}-")] for kind in KINDS}
    near = [k in removed for k in source if not k.startswith("dup-exact-")]
    return {
        "found": {kind: sum(v) / len(v) for kind, v in found.items() if v},
        "near_recall": sum(near) / max(1, len(near)),
        "recall": sum(k in removed for k in source) / max(1, len(source)),
        "false_removals": sum(k in removed for k in originals) / max(1, len(originals)),
        "originals_removed": sum(k in removed for k in originals),
    }


def removed_at(data, pairs, threshold: float) -> set[int]:
    """Sample indices ``dedup`` removes at ``threshold`` with keep-first: every member of a group but its first."""
    from data_tools.dedup import UnionFind

    i, j, similarity = pairs
    groups = UnionFind(len(data.scan.ids))
    by_hash: dict[bytes, int] = {}
    for n, digest in enumerate(data.digests):
        if digest is not None:
            groups.union(by_hash.setdefault(digest, n), n)
    for a, b in zip(i[similarity >= threshold].tolist(), j[similarity >= threshold].tolist(), strict=True):
        groups.union(a, b)
    first: dict[int, int] = {}
    order = sorted(range(len(data.scan.ids)), key=lambda n: data.scan.ids[n])
    removed = set()
    for n in order:
        root = groups.find(n)
        if root in first:
            removed.add(n)
        else:
            first[root] = n
    return removed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, required=True, help="data_tools dataset directory (clean)")
    near = parser.add_mutually_exclusive_group(required=True)
    near.add_argument("--model", help="contrastive model whose image embeddings dedup uses")
    near.add_argument("--pixels", action="store_true", help="dedup's pixel descriptor instead of a model")
    parser.add_argument("--work", type=Path, required=True, help="scratch directory (must not exist)")
    parser.add_argument("--per-kind", type=int, default=100, help="injected copies per kind")
    parser.add_argument("--offset", type=int, default=0, help="which originals: every stride-th from this one")
    parser.add_argument("--thresholds", default="0.97,0.98,0.985,0.99,0.995", help="comma-separated cosines")
    parser.add_argument("--write", type=float, default=None, help="run the real dedup at this threshold")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--out", type=Path, default=None, help="also write the result as JSON")
    args = parser.parse_args(argv)

    import numpy as np

    from data_tools import main as data_tools_main
    from data_tools.curate import Scorer
    from data_tools.dedup import _pixel_pairs, _scan_for_dedup, build_index, search_pairs
    from data_tools.pixels import PixelDescriptor

    thresholds = sorted(float(t) for t in args.thresholds.split(","))
    start = time.perf_counter()
    data_dir = args.work / "data"
    source = inject_copies(args.src, data_dir, args.per_kind, offset=args.offset)
    embedder = PixelDescriptor() if args.pixels else Scorer(args.model, "cpu")
    data = _scan_for_dedup(data_dir, "train", embedder, args.batch_size, progress=True)
    embedded = time.perf_counter()
    rows = np.asarray(data.rows)
    sample_of_row = np.flatnonzero(rows >= 0)
    if args.pixels:
        ri, rj, sims, nearest = _pixel_pairs(data.vectors, thresholds[0], "flat", None, 8)
    else:
        ri, rj, sims, nearest = search_pairs(build_index(data.vectors, "flat"), data.vectors, thresholds[0])
    pairs = (sample_of_row[ri], sample_of_row[rj], sims)
    keys = [key for _, key in data.scan.ids]
    originals = np.array([k not in source for k in keys])
    clean_nearest = nearest[originals[sample_of_row]]  # includes their similarity to injected copies
    table = []
    for threshold in thresholds:
        removed = {keys[n] for n in removed_at(data, pairs, threshold)}
        table.append({"threshold": threshold, **measure(removed, keys, source)})
    searched = time.perf_counter()
    result = {
        "src": str(args.src),
        "model": "pixels" if args.pixels else str(args.model),
        "samples": len(keys),
        "injected": len(source),
        "per_kind": args.per_kind,
        "offset": args.offset,
        "embed_s": round(embedded - start, 1),
        "search_s": round(searched - embedded, 1),
        "originals_nearest_quantiles": {
            f"q{q:g}": float(np.nanquantile(clean_nearest, q / 100)) for q in (1, 50, 90, 99)
        },
        "table": table,
    }
    print(f"{len(keys)} samples ({len(source)} injected), embedded in {result['embed_s']} s, "
          f"searched in {result['search_s']} s")  # fmt: skip
    print("| threshold | copies found | near copies found | " + " | ".join(KINDS) + " | originals removed |")
    print("|---:|---:|---:|" + "---:|" * len(KINDS) + "---:|")
    for row in table:
        kinds = " | ".join(f"{row['found'][k]:.3f}" for k in KINDS)
        print(f"| {row['threshold']:g} | {row['recall']:.3f} | {row['near_recall']:.3f} | {kinds} | "
              f"{row['originals_removed']} ({row['false_removals']:.2%}) |")  # fmt: skip
    if args.write is not None:
        out = args.work / "dedup"
        code = data_tools_main(
            ["dedup", "--src", str(data_dir), "--out", str(out), "--threshold", str(args.write),
             *(["--pixels"] if args.pixels else ["--model", str(args.model)])]
        )  # fmt: skip
        if code != 0:
            return code
        import pyarrow.parquet as pq

        written = {r["key"] for r in pq.read_table(out / "duplicates.parquet").to_pylist() if not r["kept"]}
        result["written"] = {"threshold": args.write, "dir": str(out), **measure(written, keys, source)}
        want = {keys[n] for n in removed_at(data, pairs, args.write)} if args.write >= thresholds[0] else None
        result["written"]["matches_table"] = want is None or want == written
        print(f"dedup at {args.write:g}: {json.dumps({k: v for k, v in result['written'].items()})}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
