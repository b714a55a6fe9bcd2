"""Write text-classification shards: ``(text, label)`` rows of a CSV or JSONL file → ``KEY.txt`` + ``KEY.json``
(``{"label", "class_name", …}``), no image. The ``text-classification`` task of mm-ptft trains on them.

Labels are class names (strings); with a class-name file they must be in it (an int label is then an index into
it), without one the class list is the sorted set of labels seen.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from data_tools.captions import SkipLog, WriteOptions, WriteResult, read_rows
from data_tools.shards import (
    AtomicShardWriter,
    DataToolsError,
    check_classnames_compatible,
    finish_split,
    prepare_split_dir,
    sample_key,
)


@dataclass
class TextSample:
    """One text sample: ``index`` (source order, forms the key), the text and its metadata (label, class name)."""

    index: int
    text: str
    meta: dict[str, Any] = field(default_factory=dict)


class TextShardWriter(AtomicShardWriter):
    """:class:`AtomicShardWriter` for samples without an image: ``KEY.txt`` + ``KEY.json``."""

    def write(self, sample: TextSample) -> None:  # type: ignore[override]
        if self._tar is None or self._count >= self.shard_size:
            self._finish_shard()
            self._start_shard()
        self._tar.write(
            {
                "__key__": sample_key(self.split, sample.index),
                "txt": sample.text.encode("utf-8"),
                "json": json.dumps(sample.meta, ensure_ascii=False).encode("utf-8"),
            }
        )
        self._count += 1


def write_text_samples(
    split_dir: Path, split: str, samples: Iterable[TextSample], total: int | None, shard_size: int
) -> dict[str, int]:
    """Write text samples into shards under ``split_dir``; returns ``{shard name: sample count}``."""
    with TextShardWriter(split_dir, split, shard_size) as writer:
        for sample in tqdm(samples, total=total, desc=f"writing {split}", unit="text", file=sys.stderr):
            writer.write(sample)
    return writer.sizes


def read_classnames(path: Path) -> list[str]:
    """Class names, one per line (blank lines ignored).

    Raises:
        DataToolsError: the file is missing, empty, or names a class twice.
    """
    if not path.is_file():
        raise DataToolsError(f"class-name file {path} not found")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise DataToolsError(f"class-name file {path} is empty")
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise DataToolsError(
                f"class-name file {path}: duplicate class name {name!r} (entries {seen[name] + 1} and {i + 1})"
            )
        seen[name] = i
    return names


def _label_of(value: Any, classnames: list[str] | None, where: str, src: Path) -> str:
    """The class name a row's label value stands for (checked against the class list when there is one)."""
    if classnames is not None and isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value < len(classnames):
            raise DataToolsError(f"{src} {where}: label {value} is outside the {len(classnames)} classes of the list")
        return classnames[value]
    name = str(value).strip()
    if classnames is not None and name not in classnames:
        shown = ", ".join(classnames[:8]) + (", …" if len(classnames) > 8 else "")
        raise DataToolsError(f"{src} {where}: label {name!r} is not in the class list ({shown})")
    return name


def scan_text_file(
    src: Path, text_col: str, label_col: str, classnames: list[str] | None, skips: SkipLog
) -> tuple[list[tuple[int, str, str]], list[str]]:
    """Read the usable ``(index, text, class name)`` rows and the class list.

    Raises:
        DataToolsError: a label outside ``classnames`` (one line naming the row), a missing CSV column.
    """
    rows: list[tuple[int, str, str]] = []
    for index, (where, row) in enumerate(read_rows(src, [text_col, label_col])):
        if isinstance(row, str):
            skips.add(where, row)
            continue
        text, label = row.get(text_col), row.get(label_col)
        if not isinstance(text, str) or not text.strip():
            skips.add(where, f"missing or empty text field {text_col!r}")
            continue
        if label is None or (isinstance(label, str) and not label.strip()):
            skips.add(where, f"missing label field {label_col!r}")
            continue
        rows.append((index, text.strip(), _label_of(label, classnames, where, src)))
    return rows, classnames if classnames is not None else sorted({name for _, _, name in rows})


def _text_samples(rows: list[tuple[int, str, str]], classnames: list[str], source: str) -> Iterator[TextSample]:
    label_of = {name: i for i, name in enumerate(classnames)}
    for index, text, name in rows:
        yield TextSample(index, text, {"label": label_of[name], "class_name": name, "source": source, "index": index})


def write_text_split(
    out: Path,
    split: str,
    rows: list[tuple[int, str, str]],
    classnames: list[str],
    source: str,
    options: WriteOptions,
) -> dict[str, Any]:
    """Write ``(index, text, class name)`` rows as one split; returns the split's dataset.json entry."""
    if not rows:
        raise DataToolsError(f"no usable rows for split {split!r}")
    check_classnames_compatible(out, classnames)
    split_dir = prepare_split_dir(out, split, options.overwrite)
    if options.shuffle:
        rows = list(rows)
        random.Random(options.seed).shuffle(rows)
    sizes = write_text_samples(split_dir, split, _text_samples(rows, classnames, source), len(rows), options.shard_size)
    return finish_split(out, split, sizes, options.name or out.resolve().name, classnames)


def write_text_file(
    src: Path,
    out: Path,
    split: str,
    columns: tuple[str, str] = ("text", "label"),
    classnames_file: Path | None = None,
    options: WriteOptions | None = None,
) -> WriteResult:
    """Write the ``(text, label)`` rows of a CSV (with a header) or JSONL file as one split of text shards.

    Args:
        src: the ``.csv`` or ``.jsonl`` file.
        out: dataset directory.
        split: split name (``out/<split>/``).
        columns: names of the text and label columns / keys.
        classnames_file: optional class list (one per line); labels must be in it.
        options: shard size, shuffling, name, overwrite.

    Raises:
        DataToolsError: a missing file, a duplicated class name, a label outside the class list, no usable rows.
    """
    if not src.is_file():
        raise DataToolsError(f"text file {src} not found")
    options = options or WriteOptions()
    classnames = read_classnames(classnames_file) if classnames_file is not None else None
    skips = SkipLog()
    rows, classnames = scan_text_file(src, columns[0], columns[1], classnames, skips)
    skips.report()
    entry = write_text_split(out, split, rows, classnames, str(src), options)
    return WriteResult(split, entry, skips.entries)
