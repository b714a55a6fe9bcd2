"""Command line: ``python -m data_tools COMMAND ...`` (fashion-mnist, folder, captions, clip-benchmark,
detection-scenes, coco, text, fortunes, subset, openclipart, corrupt-captions, score, filter, dedup, verify;
``--help`` lists them)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from data_tools.captions import DEFAULT_CAPTION_TEMPLATE, WriteOptions, WriteResult, write_caption_file, write_folder
from data_tools.fashion_mnist import DEFAULT_SRC, write_fashion_mnist
from data_tools.openclipart import DEFAULT_HOLDOUT, DEFAULT_MAX_PIXELS, DEFAULT_MAX_SIZE, DEFAULT_QUALITY
from data_tools.shards import DEFAULT_SHARD_SIZE, DataToolsError
from data_tools.verify import print_report, verify_dataset


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_write_options(parser: argparse.ArgumentParser, shuffle: bool = True) -> None:
    parser.add_argument("--out", type=Path, required=True, help="dataset directory to write")
    parser.add_argument("--shard-size", type=_positive_int, default=DEFAULT_SHARD_SIZE, help="samples per shard")
    parser.add_argument("--seed", type=int, default=0, help="shuffle / caption seed")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in the split directory")
    if shuffle:
        parser.add_argument("--split", default="train", help="split name: shards go to OUT/<split>/")
        parser.add_argument("--no-shuffle", dest="shuffle", action="store_false", help="keep the source order")
        parser.add_argument("--name", help="dataset name in dataset.json (default: the --out directory name)")


def build_parser() -> argparse.ArgumentParser:
    """Build the ``data_tools`` argument parser with its four subcommands."""
    parser = argparse.ArgumentParser(prog="python -m data_tools", description="Write and check webdataset shards.")
    sub = parser.add_subparsers(dest="command", required=True)

    fm = sub.add_parser("fashion-mnist", help="write Fashion-MNIST train/test shards")
    fm.add_argument("--src", type=Path, default=None, help="directory with the idx files")
    fm.add_argument("--limit", type=_positive_int, default=None, help="keep the first N samples of each split")
    _add_write_options(fm, shuffle=False)

    folder = sub.add_parser("folder", help="write SRC/<class>/<image> as one split")
    folder.add_argument("--src", type=Path, required=True, help="directory with one subdirectory per class")
    folder.add_argument("--caption-template", default=DEFAULT_CAPTION_TEMPLATE, help="caption, {} = class name")
    _add_write_options(folder)

    cap = sub.add_parser("captions", help="write (image, caption) rows of a CSV or JSONL file as one split")
    cap.add_argument("--src", type=Path, required=True, help="the .csv or .jsonl file")
    cap.add_argument("--image-col", default="image", help="column / key with the image path")
    cap.add_argument("--caption-col", default="caption", help="column / key with the caption")
    cap.add_argument("--class-col", default=None, help="optional column / key with a class name")
    cap.add_argument("--root", type=Path, default=None, help="base for relative image paths (default: file's dir)")
    _add_write_options(cap)

    cb = sub.add_parser("clip-benchmark", help="write a split in CLIP_benchmark's webdataset layout (wds/<name>)")
    cb.add_argument("--src", type=Path, required=True, help="data_tools dataset directory (with dataset.json)")
    cb.add_argument("--out", type=Path, required=True, help="CLIP_benchmark dataset root (its --dataset_root)")
    cb.add_argument("--split", default="test", help="split to convert (CLIP_benchmark's --split)")
    cb.add_argument("--shard-size", type=_positive_int, default=10_000, help="samples per tar")
    cb.add_argument("--classnames", type=Path, default=None, help="class names file instead of dataset.json's")
    cb.add_argument("--templates", type=Path, default=None, help="templates file ({} or {c}) instead of dataset.json's")
    cb.add_argument("--overwrite", action="store_true", help="replace an existing OUT/<split>")

    scenes = sub.add_parser("detection-scenes", help="write Fashion-MNIST detection scenes (COCO JSON + shards)")
    scenes.add_argument("--src", type=Path, default=None, help="directory with the Fashion-MNIST idx files")
    scenes.add_argument("--canvas", type=_positive_int, default=128, help="scene side in pixels")
    scenes.add_argument("--objects", type=_positive_int, nargs=2, default=[2, 5], help="min max items per scene")
    scenes.add_argument("--scale", type=float, nargs=2, default=[1.0, 2.0], help="min max item scale (of 28 px)")
    scenes.add_argument("--max-iou", type=float, default=0.3, help="largest overlap (IoU) between two items' boxes")
    scenes.add_argument("--train", type=int, default=12000, help="training scenes")
    scenes.add_argument("--val", type=int, default=500, help="validation scenes")
    scenes.add_argument("--test", type=int, default=1000, help="test scenes")
    _add_write_options(scenes, shuffle=False)

    coco = sub.add_parser("coco", help="write a COCO detection JSON + image folder as one split of shards")
    coco.add_argument("--ann", type=Path, required=True, help="COCO JSON (images, annotations, categories)")
    coco.add_argument("--images", type=Path, required=True, help="folder the file_name entries are relative to")
    coco.add_argument("--box-tolerance", type=float, default=1.0, help="pixels a box may stick out (clipped)")
    _add_write_options(coco)

    text = sub.add_parser("text", help="write (text, label) rows of a CSV or JSONL file as text shards (no image)")
    text.add_argument("--src", type=Path, required=True, help="the .csv or .jsonl file")
    text.add_argument("--text-col", default="text", help="column / key with the text")
    text.add_argument("--label-col", default="label", help="column / key with the class name (or index)")
    text.add_argument("--classnames", type=Path, default=None, help="class list, one per line; labels must be in it")
    _add_write_options(text)

    fortunes = sub.add_parser("fortunes", help="write Debian fortunes topics as a text dataset (fixed train/test)")
    fortunes.add_argument("--src", type=Path, default=None, help="fortune files (default /usr/share/games/fortunes)")
    fortunes.add_argument("--topics", nargs="+", default=None, help="topic files = classes (default: 4 topics)")
    fortunes.add_argument("--test-fraction", type=float, default=0.2, help="share of each topic in the test split")
    fortunes.add_argument("--max-per-topic", type=_positive_int, default=None, help="cap quotes per topic")
    fortunes.add_argument("--name", default=None, help="dataset name in dataset.json (default: fortunes)")
    _add_write_options(fortunes, shuffle=False)

    subset = sub.add_parser("subset", help="class-stratified fraction of a split (+ a held-out val split)")
    subset.add_argument("--src", type=Path, required=True, help="data_tools dataset directory")
    subset.add_argument("--split", default="train", help="split of SRC to draw from")
    subset.add_argument("--fraction", type=float, default=1.0, help="share of each class (after the holdout) kept")
    subset.add_argument("--holdout", type=float, default=0.0, help="share of each class written as OUT/val")
    _add_write_options(subset, shuffle=False)

    clip = sub.add_parser("openclipart", help="write Debian openclipart-png as caption shards (train + held-out test)")
    clip.add_argument("--src", type=Path, default=None, help="png directory (default /usr/share/openclipart/png)")
    clip.add_argument("--max-size", type=_positive_int, default=DEFAULT_MAX_SIZE, help="longest side (only shrunk)")
    clip.add_argument("--format", dest="image_format", choices=["jpg", "png"], default="jpg", help="stored image type")
    clip.add_argument("--quality", type=int, default=DEFAULT_QUALITY, help="JPEG quality")
    clip.add_argument("--holdout", type=float, default=DEFAULT_HOLDOUT, help="share of each top category in test")
    clip.add_argument("--limit", type=_positive_int, default=None, help="keep a seeded random N drawings (tests)")
    clip.add_argument("--max-pixels", type=_positive_int, default=DEFAULT_MAX_PIXELS, help="skip larger undecoded")
    _add_write_options(clip, shuffle=False)

    corrupt = sub.add_parser("corrupt-captions", help="copy a dataset with a fraction of one split's captions swapped")
    corrupt.add_argument("--src", type=Path, required=True, help="data_tools dataset directory")
    corrupt.add_argument("--out", type=Path, required=True, help="dataset directory to write")
    corrupt.add_argument("--split", default="train", help="split whose captions are replaced (others are copied)")
    corrupt.add_argument("--fraction", type=float, required=True, help="share of the split's captions replaced")
    corrupt.add_argument("--seed", type=int, default=0, help="which samples, and whose captions they get")
    corrupt.add_argument("--overwrite", action="store_true", help="replace files already in OUT")

    score = sub.add_parser("score", help="image-text cosine of every sample under a trained model (parquet)")
    score.add_argument("--model", required=True, help="run dir, checkpoint dir or .safetensors of a contrastive model")
    score.add_argument("--data", type=Path, required=True, help="data_tools dataset directory")
    score.add_argument("--split", default="train", help="split to score")
    score.add_argument("--out", type=Path, required=True, help="parquet to write (per-shard parts in OUT.parts/)")
    score.add_argument("--batch-size", type=_positive_int, default=256, help="samples per forward pass")
    score.add_argument("--rank", type=int, default=0, help="this process's share: shard i where i %% world == rank")
    score.add_argument("--world", type=_positive_int, default=1, help="number of scoring processes")
    score.add_argument("--device", default="cpu", help="torch device")
    score.add_argument("--quiet", action="store_true", help="no progress bar")
    score.add_argument("--bank", type=int, default=0,
                       help="also write a margin column: score minus the best cosine to another of the split's "
                            "first BANK distinct captions (0: no margin)")  # fmt: skip
    score.add_argument("--neighbours", type=int, default=0,
                       help="also write agreement (mean cosine of the caption to the captions of the image's "
                            "NEIGHBOURS nearest images) and consensus (mean rank of score and agreement) "
                            "columns")  # fmt: skip
    score.add_argument("--index", choices=["flat", "ivf"], default="flat",
                       help="with --neighbours: faiss index of the image embeddings, exact or IVF")  # fmt: skip

    _add_filter_parser(sub)
    _add_dedup_parser(sub)

    ver = sub.add_parser("verify", help="check shards; exit 0 clean, 1 problems, 2 usage error")
    ver.add_argument("target", help="dataset directory, split directory, shard file or brace pattern")
    ver.add_argument("--split", default=None, help="with a dataset directory, check only this split")
    ver.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _add_filter_parser(sub) -> None:
    filt = sub.add_parser("filter", help="keep the samples of a split a rule selects from a score table (+ report)")
    filt.add_argument("--src", type=Path, required=True, help="data_tools dataset directory")
    filt.add_argument("--scores", type=Path, required=True, help="parquet from data_tools score (shard, key, score)")
    filt.add_argument("--out", type=Path, required=True, help="dataset directory to write")
    filt.add_argument("--split", default="train", help="split to filter (others are copied)")
    rule = filt.add_mutually_exclusive_group(required=True)
    rule.add_argument("--min-score", type=float, default=None, help="keep samples whose value is at least X")
    rule.add_argument("--top-fraction", type=float, default=None, help="keep the F highest-valued samples")
    filt.add_argument("--per", choices=["class", "caption-cluster"], default=None, help="--top-fraction per group")
    filt.add_argument("--clusters", type=_positive_int, default=None, help="caption clusters (--per caption-cluster)")
    filt.add_argument("--model", default=None, help="model whose text tower embeds captions (--per caption-cluster)")
    filt.add_argument("--column", default="score", help="column of the scores table the rule reads")
    filt.add_argument("--corrupted", type=Path, default=None, help="corrupted.parquet: measure replaced pairs")
    filt.add_argument("--report", type=Path, default=None, help="report directory (default OUT/curation)")
    filt.add_argument("--overwrite", action="store_true", help="replace files already in OUT")
    filt.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_dedup_parser(sub) -> None:
    dedup = sub.add_parser("dedup", help="remove exact (sha256) and near (embedding cosine) duplicate images")
    dedup.add_argument("--src", type=Path, required=True, help="data_tools dataset directory")
    dedup.add_argument("--out", type=Path, required=True, help="dataset directory to write")
    dedup.add_argument("--split", default="train", help="split to deduplicate (others are copied)")
    dedup.add_argument("--model", default=None, help="contrastive model for near duplicates (else exact only)")
    dedup.add_argument("--pixels", action="store_true",
                       help="near duplicates by a pixel descriptor instead of a model (re-encoded, resized, lightly "
                            "cropped copies)")  # fmt: skip
    dedup.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="similarity that makes a near duplicate (default 0.95 with --model, 0.998 with --pixels)",
    )
    dedup.add_argument("--keep", choices=["first", "highest-score"], default="first", help="copy kept per group")
    dedup.add_argument("--scores", type=Path, default=None, help="score parquet for --keep highest-score")
    dedup.add_argument("--index", choices=["flat", "ivf"], default="flat", help="faiss index: exact or IVF")
    dedup.add_argument("--nlist", type=_positive_int, default=None, help="IVF cells (default sqrt(N))")
    dedup.add_argument("--nprobe", type=_positive_int, default=8, help="IVF cells searched per query")
    dedup.add_argument("--batch-size", type=_positive_int, default=256, help="images per forward pass")
    dedup.add_argument("--device", default="cpu", help="torch device")
    dedup.add_argument("--report", type=Path, default=None, help="report directory (default OUT/curation)")
    dedup.add_argument("--overwrite", action="store_true", help="replace files already in OUT")
    dedup.add_argument("--quiet", action="store_true", help="no progress bar")


def _run_fashion_mnist(args: argparse.Namespace) -> int:
    entries = write_fashion_mnist(
        args.out, args.src or DEFAULT_SRC, args.shard_size, args.seed, args.limit, args.overwrite
    )
    for split, entry in entries.items():
        print(
            f"{split}: {entry['num_samples']} samples in {entry['num_shards']} shards ({args.out / entry['pattern']})"
        )
    return 0


def _write_options(args: argparse.Namespace) -> WriteOptions:
    return WriteOptions(args.shard_size, args.seed, args.shuffle, args.name, args.overwrite)


def _print_result(result: WriteResult) -> int:
    entry = result.entry
    skipped = f", {len(result.skipped)} skipped" if result.skipped else ""
    print(f"{result.split}: {entry['num_samples']} samples in {entry['num_shards']} shards{skipped}")
    return 0


def _run_folder(args: argparse.Namespace) -> int:
    result = write_folder(args.src, args.out, args.split, args.caption_template, _write_options(args))
    return _print_result(result)


def _run_captions(args: argparse.Namespace) -> int:
    columns = (args.image_col, args.caption_col)
    result = write_caption_file(
        args.src, args.out, args.split, columns, args.root, args.class_col, _write_options(args)
    )
    return _print_result(result)


def _run_clip_benchmark(args: argparse.Namespace) -> int:
    from data_tools.clip_benchmark import write_clip_benchmark

    result = write_clip_benchmark(
        args.src, args.out, args.split, args.shard_size, args.classnames, args.templates, args.overwrite
    )
    print(
        f"{args.split}: {result.num_samples} samples in {result.num_shards} shards ({result.split_dir}), "
        f"{len(result.classnames)} classes"
    )
    return 0


def _run_detection_scenes(args: argparse.Namespace) -> int:
    from data_tools.detection_scenes import SceneOptions, describe, write_detection_scenes
    from data_tools.fashion_mnist import DEFAULT_SRC as FMNIST_SRC

    counts = {"train": args.train, "val": args.val, "test": args.test}
    opts = SceneOptions(args.canvas, tuple(args.objects), tuple(args.scale), args.max_iou, counts)
    results = write_detection_scenes(args.out, args.src or FMNIST_SRC, opts, args.seed, args.shard_size, args.overwrite)
    for result in results.values():
        print(describe(result))
    return 0


def _run_coco(args: argparse.Namespace) -> int:
    from data_tools.detection_scenes import describe, write_coco_split

    result = write_coco_split(
        args.ann, args.images, args.out, args.split, args.shard_size, args.overwrite, args.name, args.box_tolerance
    )
    for problem in result.problems:
        print(f"warning: {problem}", file=sys.stderr)
    print(describe(result))
    return 0


def _run_text(args: argparse.Namespace) -> int:
    from data_tools.text import write_text_file

    columns = (args.text_col, args.label_col)
    result = write_text_file(args.src, args.out, args.split, columns, args.classnames, _write_options(args))
    return _print_result(result)


def _run_fortunes(args: argparse.Namespace) -> int:
    from data_tools.fortunes import DEFAULT_SRC as FORTUNES_SRC
    from data_tools.fortunes import DEFAULT_TOPICS, write_fortunes

    options = WriteOptions(args.shard_size, args.seed, True, args.name, args.overwrite)
    entries = write_fortunes(
        args.out, args.topics or DEFAULT_TOPICS, args.src or FORTUNES_SRC, args.test_fraction, args.max_per_topic,
        options=options,
    )  # fmt: skip
    for split, entry in entries.items():
        print(f"{split}: {entry['num_samples']} quotes in {entry['num_shards']} shards")
    return 0


def _run_subset(args: argparse.Namespace) -> int:
    from data_tools.subset import write_subset

    entries = write_subset(
        args.src, args.out, args.fraction, args.holdout, args.split, args.seed, args.shard_size, args.overwrite
    )
    for split, entry in entries.items():
        print(f"{split}: {entry['num_samples']} samples in {entry['num_shards']} shards")
    return 0


def _run_openclipart(args: argparse.Namespace) -> int:
    from data_tools.openclipart import DEFAULT_SRC as OPENCLIPART_SRC
    from data_tools.openclipart import OpenclipartOptions, write_openclipart

    options = OpenclipartOptions(
        args.max_size, args.image_format, args.quality, args.holdout, args.limit, args.max_pixels, args.shard_size,
        args.seed, args.overwrite,
    )  # fmt: skip
    result = write_openclipart(args.out, args.src or OPENCLIPART_SRC, options)
    for split, entry in result.entries.items():
        print(f"{split}: {entry['num_samples']} samples in {entry['num_shards']} shards")
    per_class = ", ".join(f"{c} {sum(n[c] for n in result.counts.values())}" for c in result.classnames)
    print(f"{len(result.classnames)} classes: {per_class}")
    print(f"{result.duplicates} byte-identical copies merged, {len(result.skipped)} files skipped")
    return 0


def _run_corrupt_captions(args: argparse.Namespace) -> int:
    from data_tools.curate import CORRUPTED_PARQUET, write_corrupted_captions

    entry, replaced = write_corrupted_captions(args.src, args.out, args.fraction, args.seed, args.split, args.overwrite)
    print(f"{args.split}: {replaced} of {entry['num_samples']} captions replaced ({args.out / CORRUPTED_PARQUET})")
    return 0


def _run_score(args: argparse.Namespace) -> int:
    from data_tools.curate import score_dataset

    result = score_dataset(
        args.model, args.data, args.out, args.split, args.batch_size, args.rank, args.world, args.device,
        progress=not args.quiet, bank=args.bank, neighbours=args.neighbours, index=args.index,
    )  # fmt: skip
    print(
        f"rank {args.rank}: {result.samples} samples scored in {result.scored_shards} shards "
        f"({result.bad} unreadable), {result.skipped_shards} shards already done"
    )
    print(f"wrote {args.out}" if result.combined else "waiting for the other ranks' shards before combining")
    return 0


def _run_filter(args: argparse.Namespace) -> int:
    from data_tools.filter import FilterRule, filter_dataset

    rule = FilterRule(args.min_score, args.top_fraction, args.per, args.clusters, args.column)
    result = filter_dataset(
        args.src, args.scores, args.out, rule, args.split, args.report, args.corrupted, args.model, args.overwrite,
        progress=not args.quiet,
    )  # fmt: skip
    print(
        f"{args.split}: kept {result.kept}, removed {result.removed}, unreadable {result.unreadable} "
        f"({rule.describe()}); report in {result.report_dir}"
    )
    return 0


def _run_dedup(args: argparse.Namespace) -> int:
    from data_tools.dedup import dedup_dataset

    result = dedup_dataset(
        args.src, args.out, args.split, args.model, args.threshold, args.keep, args.scores, args.index, args.nlist,
        args.nprobe, args.batch_size, args.report, args.device, args.overwrite, progress=not args.quiet,
        pixels=args.pixels,
    )  # fmt: skip
    near = "" if args.model or args.pixels else " (no --model or --pixels: only exact duplicates removed)"
    print(
        f"{args.split}: kept {result.samples - result.exact_removed - result.near_removed} of {result.samples}; "
        f"removed {result.exact_removed} exact and {result.near_removed} near duplicates in {result.groups} groups"
        f"{near}; {args.out / 'duplicates.parquet'}, report in {result.report_dir}"
    )
    return 0


def _run_verify(args: argparse.Namespace) -> int:
    report = verify_dataset(args.target, args.split, progress=not args.quiet)
    print_report(report)
    return 0 if report.ok else 1


_COMMANDS = {
    "fashion-mnist": _run_fashion_mnist,
    "folder": _run_folder,
    "captions": _run_captions,
    "verify": _run_verify,
    "text": _run_text,
    "fortunes": _run_fortunes,
    "subset": _run_subset,
    "clip-benchmark": _run_clip_benchmark,
    "detection-scenes": _run_detection_scenes,
    "coco": _run_coco,
    "openclipart": _run_openclipart,
    "corrupt-captions": _run_corrupt_captions,
    "score": _run_score,
    "filter": _run_filter,
    "dedup": _run_dedup,
}


def main(argv: list[str] | None = None) -> int:
    """Run the ``data_tools`` command line.

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        Exit code: 0 success, 1 verify found problems, 2 usage or input error.
    """
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        code = _COMMANDS[args.command](args)
    except DataToolsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # Disk full, permission denied, ...: the message names the file, a traceback would add nothing.
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"done in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return code
