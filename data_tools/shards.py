"""Shared pieces for writing webdataset shards in the mm-ptft layout.

Layout written under a dataset directory ``OUT``::

    OUT/dataset.json            name, classnames, templates, per-split pattern and counts
    OUT/classnames.txt          one class name per line (when known)
    OUT/templates.txt           zero-shot templates with ``{}`` (when known)
    OUT/<split>/shard-000000.tar
    OUT/<split>/sizes.json      {"shard-000000.tar": n0, ...}

Every file is written under a temporary name and moved into place with ``os.replace``, so a killed writer never
leaves a half-written file under a final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

SHARD_PREFIX = "shard-"
SHARD_SUFFIX = ".tar"
TMP_SUFFIX = ".tmp"
DATASET_JSON = "dataset.json"
SIZES_JSON = "sizes.json"
DEFAULT_SHARD_SIZE = 1000

_SPLIT_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_SHARD_RE = re.compile(r"^shard-(\d{6})\.tar$")
_ARTICLE_RE = re.compile(r"\b([Aa]) \{\}")


class DataToolsError(Exception):
    """An error a person can act on; the CLI prints it as one line without a traceback."""


@dataclass
class Sample:
    """One sample ready to be written: image bytes, caption and metadata.

    Attributes:
        index: Source index (row order in the source); forms the key ``f"{split}-{index:07d}"``.
        image: Encoded image bytes, stored as-is.
        image_ext: Tar extension for the image: ``"jpg"``, ``"png"`` or ``"webp"``.
        caption: UTF-8 caption text.
        meta: JSON-serialisable metadata stored under ``json``.
    """

    index: int
    image: bytes
    image_ext: str
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)


def shard_name(shard_index: int) -> str:
    """Return the file name of shard number ``shard_index`` (``shard-000042.tar``)."""
    return f"{SHARD_PREFIX}{shard_index:06d}{SHARD_SUFFIX}"


def sample_key(split: str, index: int) -> str:
    """Return the webdataset ``__key__`` of sample ``index`` in ``split``."""
    return f"{split}-{index:07d}"


def shard_pattern(split: str, num_shards: int) -> str:
    """Return the brace pattern (relative to OUT) that expands to all shards of a split."""
    return f"{split}/{SHARD_PREFIX}{{000000..{num_shards - 1:06d}}}{SHARD_SUFFIX}"


def validate_split(split: str) -> str:
    """Check a split name is usable as a directory and key prefix.

    Raises:
        DataToolsError: The name has characters other than letters, digits, ``_`` and ``-``.
    """
    if not _SPLIT_RE.match(split):
        raise DataToolsError(f"invalid split name {split!r}: use letters, digits, '_' and '-' only")
    return split


def fill_template(template: str, name: str) -> str:
    """Fill ``{}`` in a caption template with a class name, fixing "a" → "an" before a vowel.

    Args:
        template: Text with one ``{}`` slot, e.g. ``"a photo of a {}."``.
        name: Readable class name, e.g. ``"ankle boot"``.

    Returns:
        The caption, e.g. ``"a photo of an ankle boot."``.
    """
    if name[:1].lower() in "aeiou":
        template = _ARTICLE_RE.sub(lambda m: f"{m.group(1)}n {{}}", template)
    return template.replace("{}", name)


def process_tmp(path: Path) -> Path:
    """This process's temporary name beside ``path`` (host and pid in it): processes writing the same file at once
    (``score`` ranks started together, on one host or several sharing a filesystem) never share one — the last
    rename wins, each reader sees one whole file."""
    return path.with_name(f"{path.name}.{socket.gethostname()}-{os.getpid()}{TMP_SUFFIX}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file (:func:`process_tmp`) so readers never see a partial file."""
    tmp = process_tmp(path)
    tmp.write_bytes(data)
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def read_json(path: Path) -> Any:
    """Read a JSON file, turning a parse error into a one-line ``DataToolsError``."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataToolsError(f"cannot read {path}: {exc}") from None


def existing_shards(split_dir: Path) -> list[Path]:
    """Return the final-named shard files in ``split_dir``, sorted by name."""
    if not split_dir.is_dir():
        return []
    return sorted(p for p in split_dir.iterdir() if _SHARD_RE.match(p.name))


def prepare_split_dir(out: Path, split: str, overwrite: bool) -> Path:
    """Create ``OUT/<split>/``, refusing to mix with shards of an earlier run unless asked to.

    Args:
        out: Dataset directory.
        split: Split name.
        overwrite: Allow replacing shards already in the split directory.

    Returns:
        The split directory.

    Raises:
        DataToolsError: The split already has shards and ``overwrite`` is false, or the directory cannot be made.
    """
    split_dir = out / validate_split(split)
    if existing_shards(split_dir) and not overwrite:
        raise DataToolsError(f"{split_dir} already holds shards; pass --overwrite to replace them")
    try:
        split_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataToolsError(f"cannot create {split_dir}: {exc.strerror}") from None
    # Temp files left by a killed run would otherwise linger forever.
    for tmp in split_dir.glob(f"*{TMP_SUFFIX}"):
        tmp.unlink()
    return split_dir


def check_classnames_compatible(out: Path, classnames: list[str] | None) -> None:
    """Refuse to add a split whose class list differs from the one already in ``OUT/dataset.json``.

    Labels are indices into the class list, so two splits with different lists would silently disagree.

    Raises:
        DataToolsError: The class lists differ.
    """
    path = out / DATASET_JSON
    if classnames is None or not path.is_file():
        return
    old = read_json(path).get("classnames")
    if old is not None and old != classnames:
        raise DataToolsError(
            f"class names {classnames} differ from {old} already in {path}; write to a new directory instead"
        )


class AtomicShardWriter:
    """Write samples into numbered shards of at most ``shard_size`` samples each.

    Each shard is written as ``shard-NNNNNN.tar.tmp`` and renamed to its final name only once complete.
    Use as a context manager; on an exception the current temp shard is deleted.
    """

    def __init__(self, split_dir: Path, split: str, shard_size: int) -> None:
        """Prepare a writer for ``split_dir``; no file is opened until the first sample."""
        if shard_size < 1:
            raise DataToolsError(f"--shard-size must be at least 1, got {shard_size}")
        self.split_dir = split_dir
        self.split = split
        self.shard_size = shard_size
        self.sizes: dict[str, int] = {}
        self._tar: Any = None
        self._file: Any = None
        self._count = 0
        self._mtime = int(time.time())

    def __enter__(self) -> AtomicShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort()

    def write(self, sample: Sample) -> None:
        """Append one sample, starting a new shard when the current one is full."""
        if self._tar is None or self._count >= self.shard_size:
            self._finish_shard()
            self._start_shard()
        self._tar.write(
            {
                "__key__": sample_key(self.split, sample.index),
                sample.image_ext: sample.image,
                "txt": sample.caption.encode("utf-8"),
                "json": json.dumps(sample.meta, ensure_ascii=False).encode("utf-8"),
            }
        )
        self._count += 1

    def close(self) -> dict[str, int]:
        """Finish the last shard and return ``{shard name: sample count}``."""
        self._finish_shard()
        return self.sizes

    def _current_paths(self) -> tuple[Path, Path]:
        final = self.split_dir / shard_name(len(self.sizes))
        return final, final.with_name(final.name + TMP_SUFFIX)

    def _start_shard(self) -> None:
        # Imported here because webdataset pulls in torch, which would make `import data_tools` slow.
        from webdataset import TarWriter

        _, tmp = self._current_paths()
        # Kept open across write() calls; closed in _finish_shard or _abort.
        self._file = tmp.open("wb")
        # An integer mtime keeps members plain ustar; TarWriter's default float time.time() adds a PAX header
        # to every member, doubling shard size and read time.
        self._tar = TarWriter(self._file, encoder=False, mtime=self._mtime)
        self._count = 0

    def _finish_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._file.close()
        final, tmp = self._current_paths()
        os.replace(tmp, final)
        self.sizes[final.name] = self._count
        self._tar = self._file = None

    def _abort(self) -> None:
        if self._tar is None:
            return
        # Close the tar stream before its file, else tarfile later tries to flush into the closed file; errors are
        # ignored because the temp shard is deleted anyway and the original exception is the one worth seeing.
        with contextlib.suppress(OSError, ValueError):
            self._tar.close()
        self._file.close()
        self._current_paths()[1].unlink(missing_ok=True)
        self._tar = self._file = None


def write_samples(
    split_dir: Path, split: str, samples: Iterable[Sample], total: int | None, shard_size: int
) -> dict[str, int]:
    """Write ``samples`` into shards under ``split_dir`` with a progress bar.

    Args:
        split_dir: ``OUT/<split>/``, already prepared.
        split: Split name used in keys.
        samples: Samples in the order they should appear in the shards.
        total: Expected number of samples, for the progress bar; ``None`` if unknown.
        shard_size: Maximum samples per shard.

    Returns:
        ``{shard name: sample count}`` for the shards written.
    """
    with AtomicShardWriter(split_dir, split, shard_size) as writer:
        for sample in tqdm(samples, total=total, desc=f"writing {split}", unit="img", file=sys.stderr):
            writer.write(sample)
    return writer.sizes


def _remove_stale_shards(split_dir: Path, sizes: dict[str, int]) -> None:
    # A rewrite with fewer samples would otherwise leave old shards that no pattern or sizes.json mentions.
    for path in existing_shards(split_dir):
        if path.name not in sizes:
            path.unlink()


def finish_split(
    out: Path,
    split: str,
    sizes: dict[str, int],
    name: str,
    classnames: list[str] | None = None,
    templates: list[str] | None = None,
) -> dict[str, Any]:
    """Write ``sizes.json`` for a split and merge the split into ``OUT/dataset.json``.

    Also writes ``classnames.txt`` and ``templates.txt`` when they are given.

    Args:
        out: Dataset directory.
        split: Split name.
        sizes: Output of ``write_samples``.
        name: Dataset name, kept from an existing ``dataset.json`` if there is one.
        classnames: Class names by label id, if known.
        templates: Zero-shot prompt templates with ``{}``, if known.

    Returns:
        The split's entry in ``dataset.json``.
    """
    split_dir = out / split
    _remove_stale_shards(split_dir, sizes)
    atomic_write_json(split_dir / SIZES_JSON, sizes)
    entry = {"pattern": shard_pattern(split, len(sizes)), "num_samples": sum(sizes.values()), "num_shards": len(sizes)}
    meta = read_json(out / DATASET_JSON) if (out / DATASET_JSON).is_file() else {}
    meta.setdefault("name", name)
    if classnames is not None:
        meta["classnames"] = classnames
        atomic_write_bytes(out / "classnames.txt", "".join(f"{c}\n" for c in classnames).encode("utf-8"))
    if templates is not None:
        meta["templates"] = templates
        atomic_write_bytes(out / "templates.txt", "".join(f"{t}\n" for t in templates).encode("utf-8"))
    meta.setdefault("splits", {})[split] = entry
    meta["splits"] = dict(sorted(meta["splits"].items()))
    atomic_write_json(out / DATASET_JSON, meta)
    return entry
