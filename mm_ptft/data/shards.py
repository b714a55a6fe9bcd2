"""Finding shards: a dataset directory written by ``data_tools`` or a brace pattern of tar URLs."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import braceexpand


class DataError(RuntimeError):
    """A data problem a person can act on (missing shards, unreadable metadata, too many bad samples)."""


@dataclass
class ShardSet:
    urls: list[str]
    num_samples: int | None = None  # total samples, when sizes.json knows them
    sizes: dict[str, int] = field(default_factory=dict)  # url → samples
    meta: dict = field(default_factory=dict)  # dataset.json (classnames, templates, …) when there is one
    spec: str = ""


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"data: cannot read {path}: {e}") from None


def _sizes_for(urls: list[str]) -> dict[str, int]:
    """Sample counts from each directory's sizes.json (webdataset / open_clip convention)."""
    sizes: dict[str, int] = {}
    by_dir: dict[str, dict] = {}
    for url in urls:
        if not _is_local(url):
            continue
        directory = os.path.dirname(url)
        if directory not in by_dir:
            path = Path(directory) / "sizes.json"
            by_dir[directory] = _read_json(path) if path.is_file() else {}
        count = by_dir[directory].get(os.path.basename(url))
        if count is not None:
            sizes[url] = int(count)
    return sizes


def resolve_shards(spec: str, split: str = "train") -> ShardSet:
    """Expand ``spec`` into shard URLs and check that local ones exist.

    Args:
        spec: a dataset directory holding ``dataset.json`` (the split's pattern is read from it), a directory of
            ``*.tar`` files, or a brace pattern such as ``data/train/shard-{000000..000059}.tar`` (several patterns
            may be joined with ``::``). ``pipe:`` and URL shards are passed through unchecked.
        split: the split to use inside a dataset directory.

    Raises:
        DataError: naming the pattern and the first missing path.
    """
    meta: dict = {}
    root = Path(spec).expanduser()
    if _is_local(spec) and root.is_dir():
        if (root / "dataset.json").is_file():
            meta = _read_json(root / "dataset.json")
            splits = meta.get("splits", {})
            if split not in splits:
                raise DataError(f"data: split '{split}' not in {root / 'dataset.json'} (has: {', '.join(splits)})")
            patterns = [str(root / splits[split]["pattern"])]
        else:
            tars = sorted(str(p) for p in root.glob("*.tar"))
            if not tars and (root / split).is_dir():
                tars = sorted(str(p) for p in (root / split).glob("*.tar"))
            if not tars:
                raise DataError(f"data: no dataset.json and no *.tar shards in {root}")
            patterns = tars
    else:
        patterns = spec.split("::")
    urls = [u for pattern in patterns for u in braceexpand.braceexpand(pattern)]
    if not urls:
        raise DataError(f"data: pattern '{spec}' expands to no shards")
    missing = [u for u in urls if _is_local(u) and not os.path.isfile(u)]
    if missing:
        raise DataError(
            f"data: {len(missing)} of {len(urls)} shards of '{spec}' do not exist, first: {missing[0]}"
        )
    sizes = _sizes_for(urls)
    num_samples = sum(sizes.values()) if len(sizes) == len(urls) else None
    if meta and split in meta.get("splits", {}):
        num_samples = meta["splits"][split].get("num_samples", num_samples)
    return ShardSet(urls=urls, num_samples=num_samples, sizes=sizes, meta=meta, spec=spec)
