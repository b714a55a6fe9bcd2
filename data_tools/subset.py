"""Write a class-stratified subset of a split (label-fraction studies) and optionally a held-out validation split.

For each class (json ``label``), the split's samples are permuted with a seeded RNG: the first ``holdout`` share
goes to ``val``, and the first ``fraction`` of the rest to ``train``. Samples are copied unchanged, keys included
(a subset key still leads back to its source). The same seed gives the same ``val`` split for every fraction, and a
smaller fraction's ``train`` is contained in a larger one's.
"""

from __future__ import annotations

import io
import json
import random
import sys
import tarfile
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from braceexpand import braceexpand
from tqdm import tqdm

from data_tools.shards import (
    DATASET_JSON,
    AtomicShardWriter,
    DataToolsError,
    finish_split,
    prepare_split_dir,
    read_json,
)


class RawShardWriter(AtomicShardWriter):
    """:class:`AtomicShardWriter` for samples read from other shards: ``{"__key__", field: bytes}`` as they are."""

    def write(self, sample: dict[str, Any]) -> None:  # type: ignore[override]
        if self._tar is None or self._count >= self.shard_size:
            self._finish_shard()
            self._start_shard()
        self._tar.write(sample)
        self._count += 1


def read_split(src: Path, split: str) -> tuple[dict, list[dict[str, Any]]]:
    """(dataset.json, every sample of ``split`` as ``{"__key__", field: bytes}``) of a data_tools dataset dir."""
    if not (src / DATASET_JSON).is_file():
        raise DataToolsError(f"{src} has no {DATASET_JSON} (write it with python -m data_tools)")
    meta = read_json(src / DATASET_JSON)
    splits = meta.get("splits", {})
    if split not in splits:
        raise DataToolsError(f"split {split!r} not in {src / DATASET_JSON} (has: {', '.join(splits)})")
    samples: list[dict[str, Any]] = []
    for url in braceexpand(str(src / splits[split]["pattern"])):
        samples.extend(_read_tar(Path(url)))
    return meta, samples


def _read_tar(path: Path) -> Iterator[dict[str, Any]]:
    current: dict[str, Any] | None = None
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                directory, _, base = member.name.rpartition("/")
                stem, _, ext = base.partition(".")  # webdataset's rule: the key ends at the basename's first '.'
                key = f"{directory}/{stem}" if directory else stem
                if current is None or current["__key__"] != key:
                    if current is not None:
                        yield current
                    current = {"__key__": key}
                current[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError) as exc:
        raise DataToolsError(f"cannot read {path}: {exc}") from None
    if current is not None:
        yield current


def _label(sample: dict[str, Any]) -> int:
    try:
        label = json.load(io.BytesIO(sample["json"]))["label"]
    except (KeyError, ValueError, TypeError):
        raise DataToolsError(f"sample {sample['__key__']} has no json label; a stratified subset needs one") from None
    return int(label)


def select(labels: list[int], fraction: float, holdout: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, val indices): per class a seeded permutation, ``holdout`` of it to val, then ``fraction`` of
    the rest to train (at least one sample per class when the fraction is positive)."""
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        by_class[label].append(i)
    train, val = [], []
    for label in sorted(by_class):
        members = by_class[label]
        random.Random(seed * 1_000_003 + label).shuffle(members)
        n_val = round(len(members) * holdout)
        rest = members[n_val:]
        n_train = max(1, round(len(rest) * fraction)) if rest else 0
        val += members[:n_val]
        train += rest[:n_train]
    return sorted(train), sorted(val)


def write_subset(
    src: Path,
    out: Path,
    fraction: float = 1.0,
    holdout: float = 0.0,
    split: str = "train",
    seed: int = 0,
    shard_size: int = 1000,
    overwrite: bool = False,
) -> dict[str, dict]:
    """Write ``fraction`` of ``src``'s ``split`` (class-stratified) as ``out/train``, and ``holdout`` of it as
    ``out/val`` (when > 0). Class names and templates are copied from ``src``'s dataset.json.

    Returns:
        The dataset.json entries written.
    """
    if not 0 < fraction <= 1:
        raise DataToolsError(f"--fraction must be in (0, 1], got {fraction}")
    if not 0 <= holdout < 1:
        raise DataToolsError(f"--holdout must be in [0, 1), got {holdout}")
    if out.resolve() == src.resolve():
        raise DataToolsError("--out must differ from --src")
    meta, samples = read_split(src, split)
    train, val = select([_label(s) for s in samples], fraction, holdout, seed)
    shuffle = random.Random(seed)
    entries = {}
    for name, indices in (("train", train), ("val", val)):
        if not indices:
            continue
        shuffle.shuffle(indices)  # shards mix classes
        split_dir = prepare_split_dir(out, name, overwrite)
        with RawShardWriter(split_dir, name, shard_size) as writer:
            for i in tqdm(indices, desc=f"writing {name}", unit="sample", file=sys.stderr):
                writer.write(samples[i])
        name_out = f"{meta.get('name', src.name)}-{split}-f{fraction:g}-h{holdout:g}-s{seed}"
        entries[name] = finish_split(out, name, writer.sizes, name_out, meta.get("classnames"), meta.get("templates"))
    return entries
