"""Command line: ``python -m data_tools {fashion-mnist,folder,captions,verify} ...``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from data_tools.captions import DEFAULT_CAPTION_TEMPLATE, WriteOptions, WriteResult, write_caption_file, write_folder
from data_tools.fashion_mnist import DEFAULT_SRC, write_fashion_mnist
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

    ver = sub.add_parser("verify", help="check shards; exit 0 clean, 1 problems, 2 usage error")
    ver.add_argument("target", help="dataset directory, split directory, shard file or brace pattern")
    ver.add_argument("--split", default=None, help="with a dataset directory, check only this split")
    ver.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


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


def _run_verify(args: argparse.Namespace) -> int:
    report = verify_dataset(args.target, args.split, progress=not args.quiet)
    print_report(report)
    return 0 if report.ok else 1


_COMMANDS = {
    "fashion-mnist": _run_fashion_mnist,
    "folder": _run_folder,
    "captions": _run_captions,
    "verify": _run_verify,
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
