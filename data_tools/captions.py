"""Write image-caption pairs from a class folder tree, a CSV file or a JSONL file as webdataset shards.

Image bytes are copied unchanged (never re-encoded); rows that cannot be used are skipped, counted and reported.
"""

from __future__ import annotations

import csv
import json
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from data_tools.shards import (
    DEFAULT_SHARD_SIZE,
    DataToolsError,
    Sample,
    check_classnames_compatible,
    fill_template,
    finish_split,
    prepare_split_dir,
    write_samples,
)

DEFAULT_CAPTION_TEMPLATE = "a photo of a {}."
# Source suffix -> tar extension; .jpeg is stored as jpg so readers only need to know three names.
IMAGE_SUFFIXES = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
MAX_WARNINGS = 20


@dataclass
class SkipLog:
    """Rows that were skipped, as ``(where, reason)`` pairs, reported together at the end."""

    entries: list[tuple[str, str]] = field(default_factory=list)

    def add(self, where: str, reason: str) -> None:
        """Record that the row or file ``where`` was skipped because of ``reason``."""
        self.entries.append((where, reason))

    def report(self, stream: TextIO | None = None, max_shown: int = MAX_WARNINGS) -> None:
        """Print one warning line per skipped row (at most ``max_shown``), then the total."""
        stream = stream or sys.stderr
        for where, reason in self.entries[:max_shown]:
            print(f"warning: skipped {where}: {reason}", file=stream)
        hidden = len(self.entries) - max_shown
        if hidden > 0:
            print(f"warning: ... and {hidden} more skipped", file=stream)
        if self.entries:
            print(f"warning: {len(self.entries)} rows skipped in total", file=stream)


@dataclass
class Candidate:
    """A source row that passed the cheap checks; its image is read only when it is written."""

    index: int
    path: Path
    caption: str
    label: int | None = None
    class_name: str | None = None


@dataclass
class WriteResult:
    """What a folder or caption-file write produced.

    Attributes:
        split: Split name.
        entry: The split's entry in ``dataset.json`` (pattern, num_samples, num_shards).
        skipped: ``(where, reason)`` for every row that was not written.
    """

    split: str
    entry: dict[str, Any]
    skipped: list[tuple[str, str]]


def readable_class(dirname: str) -> str:
    """Turn a class directory name into the class name used in captions (``ankle_boot`` → ``ankle boot``)."""
    return dirname.replace("_", " ").strip()


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


def _class_dirs(src: Path) -> list[Path]:
    return sorted(p for p in src.iterdir() if p.is_dir() and not _is_hidden(p))


def _folder_caption(image: Path, name: str, template: str) -> str:
    sidecar = image.with_suffix(".txt")
    if sidecar.is_file():
        return sidecar.read_text(encoding="utf-8", errors="replace").strip()
    return fill_template(template, name)


def scan_folder(src: Path, template: str, skips: SkipLog) -> tuple[list[Candidate], list[str]]:
    """List the images of ``src/<class>/*`` with their captions and label ids.

    Args:
        src: Root directory with one subdirectory per class.
        template: Caption template with ``{}`` for the class name; a sidecar ``<image>.txt`` overrides it.
        skips: Receives files that cannot be used.

    Returns:
        ``(candidates, classnames)``; class ids follow the alphabetical order of the directory names.
    """
    class_dirs = _class_dirs(src)
    classnames = [readable_class(d.name) for d in class_dirs]
    candidates: list[Candidate] = []
    index = 0
    for label, class_dir in enumerate(class_dirs):
        for path in sorted(p for p in class_dir.iterdir() if p.is_file() and not _is_hidden(p)):
            suffix = path.suffix.lower()
            if suffix == ".txt":
                continue  # caption sidecar, read together with its image
            if suffix not in IMAGE_SUFFIXES:
                skips.add(str(path), f"unsupported file type {suffix or '(none)'}")
            else:
                caption = _folder_caption(path, classnames[label], template)
                if caption:
                    candidates.append(Candidate(index, path, caption, label, classnames[label]))
                else:
                    skips.add(str(path), "empty caption")
            index += 1
    return candidates, classnames


def _open_text(path: Path) -> TextIO:
    # utf-8-sig drops the BOM that spreadsheet programs put at the start of exported CSV files.
    return open(path, encoding="utf-8-sig", newline="")


def _csv_rows(path: Path, columns: list[str]) -> Iterator[tuple[str, dict[str, Any] | str]]:
    with _open_text(path) as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in columns if c not in header]
        if missing:
            raise DataToolsError(f"{path} has no column {missing[0]!r} (columns: {', '.join(header) or 'none'})")
        for row_number, row in enumerate(reader, start=1):
            yield f"row {row_number}", row


def _jsonl_rows(path: Path) -> Iterator[tuple[str, dict[str, Any] | str]]:
    with _open_text(path) as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                yield f"line {line_number}", f"invalid JSON ({exc.msg})"
                continue
            yield f"line {line_number}", row if isinstance(row, dict) else "not a JSON object"


def read_rows(path: Path, columns: list[str]) -> Iterator[tuple[str, dict[str, Any] | str]]:
    """Yield ``(where, row)`` from a CSV or JSONL file; ``row`` is a reason string when the row is unreadable.

    Raises:
        DataToolsError: Unknown file type, missing CSV columns, or a file that is not UTF-8.
    """
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise DataToolsError(f"{path}: expected a .csv or .jsonl file")
    rows = _csv_rows(path, columns) if suffix == ".csv" else _jsonl_rows(path)
    try:
        yield from rows
    except UnicodeDecodeError as exc:
        raise DataToolsError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _row_problem(row: dict[str, Any], image_col: str, caption_col: str, root: Path) -> str | None:
    for col in (image_col, caption_col):
        if not isinstance(row.get(col), str):
            return f"missing or non-text field {col!r}"
    image = root / row[image_col].strip()
    if not row[caption_col].strip():
        return "empty caption"
    if image.suffix.lower() not in IMAGE_SUFFIXES:
        return f"unsupported image type {image.suffix or '(none)'}"
    if not image.is_file():
        return f"missing image file {image}"
    return None


def scan_caption_file(
    src: Path, image_col: str, caption_col: str, root: Path, class_col: str | None, skips: SkipLog
) -> tuple[list[Candidate], list[str] | None]:
    """Read the usable ``(image, caption)`` rows of a CSV or JSONL file.

    Args:
        src: The ``.csv`` or ``.jsonl`` file.
        image_col: Column / key holding the image path; relative paths resolve against ``root``.
        caption_col: Column / key holding the caption.
        root: Directory that relative image paths are relative to.
        class_col: Optional column with a class name; labels then follow the sorted class names.
        skips: Receives rows that cannot be used.

    Returns:
        ``(candidates, classnames)``; ``classnames`` is ``None`` without ``class_col``.
    """
    columns = [image_col, caption_col] + ([class_col] if class_col else [])
    candidates: list[Candidate] = []
    for index, (where, row) in enumerate(read_rows(src, columns)):
        problem = row if isinstance(row, str) else _row_problem(row, image_col, caption_col, root)
        if problem is None and class_col and not str(row.get(class_col) or "").strip():
            problem = f"empty field {class_col!r}"
        if problem is not None:
            skips.add(where, problem)
            continue
        name = str(row[class_col]).strip() if class_col else None
        candidates.append(Candidate(index, root / row[image_col].strip(), row[caption_col].strip(), None, name))
    if not class_col:
        return candidates, None
    classnames = sorted({c.class_name for c in candidates if c.class_name})
    label_of = {name: label for label, name in enumerate(classnames)}
    for c in candidates:
        c.label = label_of[c.class_name]
    return candidates, classnames


def _samples(candidates: list[Candidate], skips: SkipLog) -> Iterator[Sample]:
    for c in candidates:
        try:
            data = c.path.read_bytes()
        except OSError as exc:
            skips.add(str(c.path), f"cannot read image ({exc.strerror})")
            continue
        if not data:
            skips.add(str(c.path), "empty image file")
            continue
        meta: dict[str, Any] = {"source": str(c.path), "index": c.index}
        if c.label is not None:
            meta |= {"label": c.label, "class_name": c.class_name}
        yield Sample(c.index, data, IMAGE_SUFFIXES[c.path.suffix.lower()], c.caption, meta)


@dataclass
class WriteOptions:
    """Options shared by the folder and caption-file writers.

    Attributes:
        shard_size: Maximum samples per shard.
        seed: Shuffle seed.
        shuffle: Shuffle the samples before writing (so shards mix classes); off keeps the source order.
        name: Dataset name for ``dataset.json``; defaults to the output directory's name.
        overwrite: Replace shards from an earlier run of the same split.
    """

    shard_size: int = DEFAULT_SHARD_SIZE
    seed: int = 0
    shuffle: bool = True
    name: str | None = None
    overwrite: bool = False


def _write(
    out: Path,
    split: str,
    candidates: list[Candidate],
    labels: tuple[list[str] | None, list[str] | None],
    options: WriteOptions,
    skips: SkipLog,
) -> WriteResult:
    classnames, templates = labels
    if not candidates:
        skips.report()
        raise DataToolsError(f"no usable samples for split {split!r} ({len(skips.entries)} skipped)")
    check_classnames_compatible(out, classnames)
    split_dir = prepare_split_dir(out, split, options.overwrite)
    if options.shuffle:
        random.Random(options.seed).shuffle(candidates)
    sizes = write_samples(split_dir, split, _samples(candidates, skips), len(candidates), options.shard_size)
    skips.report()
    if not sizes:
        raise DataToolsError(f"no readable images for split {split!r} ({len(skips.entries)} skipped)")
    name = options.name or out.resolve().name
    entry = finish_split(out, split, sizes, name, classnames, templates)
    return WriteResult(split, entry, skips.entries)


def write_folder(
    src: Path,
    out: Path,
    split: str,
    caption_template: str = DEFAULT_CAPTION_TEMPLATE,
    options: WriteOptions | None = None,
) -> WriteResult:
    """Write ``src/<class>/*.{jpg,jpeg,png,webp}`` as one split of shards under ``out``.

    Args:
        src: Root directory with one subdirectory per class.
        out: Dataset directory.
        split: Split name (``out/<split>/``).
        caption_template: Caption with ``{}`` for the class name (underscores become spaces).
        options: Shard size, shuffling, name, overwrite.

    Returns:
        The split's dataset.json entry and the skipped files.

    Raises:
        DataToolsError: ``src`` is missing, the template has no ``{}``, or nothing usable was found.
    """
    if not src.is_dir():
        raise DataToolsError(f"source directory {src} not found")
    if "{}" not in caption_template:
        raise DataToolsError(f"caption template {caption_template!r} has no '{{}}' for the class name")
    skips = SkipLog()
    candidates, classnames = scan_folder(src, caption_template, skips)
    if not classnames:
        raise DataToolsError(f"{src} has no class subdirectories (expected {src}/<class>/<image>)")
    return _write(out, split, candidates, (classnames, [caption_template]), options or WriteOptions(), skips)


def write_caption_file(
    src: Path,
    out: Path,
    split: str,
    columns: tuple[str, str] = ("image", "caption"),
    root: Path | None = None,
    class_col: str | None = None,
    options: WriteOptions | None = None,
) -> WriteResult:
    """Write the ``(image path, caption)`` rows of a CSV or JSONL file as one split of shards under ``out``.

    Args:
        src: The ``.csv`` (with a header row) or ``.jsonl`` (one object per line) file.
        out: Dataset directory.
        split: Split name (``out/<split>/``).
        columns: Names of the image-path and caption columns / keys.
        root: Directory relative image paths resolve against; defaults to ``src``'s directory.
        class_col: Optional column / key with a class name, giving ``label``/``class_name`` metadata.
        options: Shard size, shuffling, name, overwrite.

    Returns:
        The split's dataset.json entry and the skipped rows.

    Raises:
        DataToolsError: ``src`` or ``root`` is missing, a CSV column is missing, or nothing usable was found.
    """
    if not src.is_file():
        raise DataToolsError(f"caption file {src} not found")
    root = src.parent if root is None else root
    if not root.is_dir():
        raise DataToolsError(f"image root directory {root} not found")
    skips = SkipLog()
    candidates, classnames = scan_caption_file(src, columns[0], columns[1], root, class_col, skips)
    return _write(out, split, candidates, (classnames, None), options or WriteOptions(), skips)
