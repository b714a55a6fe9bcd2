"""Finding shards — a dataset directory written by ``data_tools``, a directory of ``*.tar`` files (img2dataset's
output, say) or a brace pattern of shard URLs, each local or remote — and how many samples each shard holds.

A shard's sample count comes from a ``sizes.json`` next to it (webdataset / open_clip convention), else from the
``NNNNN_stats.json`` img2dataset writes next to each ``NNNNN.tar`` (its ``successes``); a dataset dir's
``dataset.json`` gives the split's total. A remote dataset dir (``https://host/fmnist``, ``s3://bucket/fmnist``)
is read exactly like a local one: its ``dataset.json`` is fetched and the split patterns are relative to it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import braceexpand

from mm_ptft.config import RemoteConfig
from mm_ptft.data.remote import ShardReadError, filesystem, is_local, read_bytes

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


class DataError(RuntimeError):
    """A data problem a person can act on (missing shards, unreadable metadata, too many bad samples)."""


@dataclass
class ShardSet:
    urls: list[str]
    num_samples: int | None = None  # total samples, when sizes.json (or dataset.json) knows them
    sizes: dict[str, int] = field(default_factory=dict)  # url → samples
    meta: dict = field(default_factory=dict)  # dataset.json (classnames, templates, …) when there is one
    spec: str = ""


def _is_local(url: str) -> bool:
    return is_local(url)


def _load_json(where: str, remote: RemoteConfig | None) -> dict | None:
    """A JSON object from a local path or a URL; None when it does not exist."""
    try:
        raw = read_bytes(where, remote)
    except ShardReadError as e:
        raise DataError(f"data: cannot read {where}: {e.detail}") from None
    except OSError as e:
        raise DataError(f"data: cannot read {where}: {e}") from None
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"data: cannot read {where}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise DataError(f"data: {where} holds a {type(value).__name__}, not a JSON object")
    return value


def _read_json(path: Path) -> dict:
    value = _load_json(str(path), None)
    if value is None:
        raise DataError(f"data: cannot read {path}: no such file")
    return value


def _split_patterns(meta: dict, split: str, base: str, where: str) -> list[str]:
    splits = meta.get("splits", {})
    if split not in splits:
        raise DataError(f"data: split '{split}' not in {where} (has: {', '.join(splits)})")
    pattern = splits[split].get("pattern") if isinstance(splits[split], dict) else None
    if not isinstance(pattern, str):
        raise DataError(f"data: split '{split}' in {where} has no shard pattern")
    return [f"{base.rstrip('/')}/{pattern}"]


def _local_dir(root: Path, split: str) -> tuple[dict, list[str]]:
    if (root / "dataset.json").is_file():
        meta = _read_json(root / "dataset.json")
        return meta, _split_patterns(meta, split, str(root), str(root / "dataset.json"))
    tars = sorted(str(p) for p in root.glob("*.tar"))
    if not tars and (root / split).is_dir():
        tars = sorted(str(p) for p in (root / split).glob("*.tar"))
    if not tars:
        raise DataError(f"data: no dataset.json and no *.tar shards in {root}")
    return {}, tars


def _is_remote_dir(spec: str) -> bool:
    """A remote spec naming a directory rather than shards: one URL, no braces, not ending in a tar suffix."""
    if is_local(spec) or spec.startswith("pipe:") or "::" in spec or "{" in spec:
        return False
    return not urlsplit(spec).path.rstrip("/").endswith(TAR_SUFFIXES)


def _list_tars(base: str, remote: RemoteConfig | None) -> list[str]:
    """``*.tar`` under a remote dir, for protocols that can list (s3, not http); [] when it cannot."""
    if urlsplit(base).scheme.lower() in ("http", "https"):
        return []
    try:
        fs, path = filesystem(base, remote)
        return sorted(fs.unstrip_protocol(p) for p in fs.glob(f"{path.rstrip('/')}/*.tar"))
    except Exception as e:  # noqa: BLE001 - listing is a convenience; the caller names what is missing
        raise DataError(f"data: cannot list {base}: {type(e).__name__}: {e}") from None


def _remote_dir(spec: str, split: str, remote: RemoteConfig | None) -> tuple[dict, list[str]]:
    base = spec.rstrip("/")
    where = f"{base}/dataset.json"
    meta = _load_json(where, remote)
    if meta is not None:
        return meta, _split_patterns(meta, split, base, where)
    tars = _list_tars(base, remote) or _list_tars(f"{base}/{split}", remote)
    if not tars:
        raise DataError(
            f"data: {where} not found (a remote URL without braces that does not end in .tar names a dataset dir, "
            "which needs the dataset.json data_tools writes; for shards give their URLs, e.g. "
            ".../shard-{000000..000009}.tar)"
        )
    return {}, tars


def _check_protocols(urls: list[str]) -> None:
    """Every URL's protocol has a reader here: a missing package is one error now, not a skipped shard each time."""
    protocols: dict[str, str] = {}  # protocol → its first URL
    for url in urls:
        if not is_local(url) and not url.startswith("pipe:"):
            protocols.setdefault(url.split("://", 1)[0].lower(), url)
    for protocol, url in protocols.items():
        if protocol in ("http", "https", "file"):
            continue
        import fsspec

        try:
            fsspec.get_filesystem_class(protocol)
        except (ImportError, ValueError) as e:
            raise DataError(f"data: cannot read {url}: {e}") from None


def _parent_and_name(url: str) -> tuple[str, str]:
    if is_local(url):
        return os.path.dirname(url), os.path.basename(url)
    parent, _, name = url.rpartition("/")
    return parent, name


def _stats_count(url: str, remote: RemoteConfig | None) -> int | None:
    """``successes`` of img2dataset's ``NNNNN_stats.json`` next to ``NNNNN.tar``; None without one."""
    parent, name = _parent_and_name(url)
    stem = next((name[: -len(s)] for s in TAR_SUFFIXES if name.endswith(s)), None)
    if stem is None:
        return None
    where = os.path.join(parent, f"{stem}_stats.json") if is_local(url) else f"{parent}/{stem}_stats.json"
    try:
        stats = _load_json(where, remote)
    except DataError:
        if is_local(url):
            raise
        return None  # a remote shard's count is a nicety: unknown, not fatal
    if stats is None:
        return None
    if not isinstance(stats.get("successes"), int):
        raise DataError(f"data: {where} has no integer 'successes' (img2dataset's per-shard sample count)")
    return stats["successes"]


def _sizes_for(urls: list[str], remote: RemoteConfig | None = None, strict: bool = True) -> dict[str, int]:
    """Sample counts from each directory's sizes.json, else from img2dataset's per-shard ``_stats.json``.

    ``strict``: a remote sizes.json that exists but cannot be read is an error (False → sizes unknown).
    """
    sizes: dict[str, int] = {}
    listed: dict[str, dict | None] = {}
    no_stats: set[str] = set()  # remote dirs where a shard had no _stats.json: don't ask for every shard
    for url in urls:
        if url.startswith("pipe:"):
            continue
        parent, name = _parent_and_name(url)
        if parent not in listed:
            where = os.path.join(parent, "sizes.json") if is_local(url) else f"{parent}/sizes.json"
            try:
                listed[parent] = _load_json(where, remote)
            except DataError:
                if strict or is_local(url):
                    raise
                listed[parent] = None
        if listed[parent] is not None:
            count = listed[parent].get(name)
            if count is not None:
                sizes[url] = int(count)
            continue
        if parent in no_stats:
            continue
        count = _stats_count(url, remote)
        if count is not None:
            sizes[url] = count
        elif not is_local(url):
            no_stats.add(parent)
    return sizes


def resolve_shards(spec: str, split: str = "train", remote: RemoteConfig | None = None) -> ShardSet:
    """Expand ``spec`` into shard URLs and check that local ones exist.

    Args:
        spec: a dataset directory holding ``dataset.json`` (the split's pattern is read from it), a directory of
            ``*.tar`` files, or a brace pattern such as ``data/train/shard-{000000..000059}.tar`` (several patterns
            may be joined with ``::``); each local or remote (``https://host/fmnist``, ``s3://bucket/fmnist``, or
            patterns of such URLs). ``pipe:`` shards are passed through unchecked; remote shards are not checked
            for existence (a missing one is skipped and counted when it is read).
        split: the split to use inside a dataset directory.
        remote: timeouts and retries for fetching remote metadata (None → :class:`RemoteConfig` defaults).

    Raises:
        DataError: naming the pattern and the first missing path, or the dataset.json / sizes.json that is
            missing or unreadable.
    """
    meta: dict = {}
    root = Path(spec).expanduser()
    if _is_local(spec) and root.is_dir():
        meta, patterns = _local_dir(root, split)
    elif _is_remote_dir(spec):
        meta, patterns = _remote_dir(spec, split, remote)
    else:
        patterns = spec.split("::")
    urls = [u for pattern in patterns for u in braceexpand.braceexpand(pattern)]
    if not urls:
        raise DataError(f"data: pattern '{spec}' expands to no shards")
    missing = [u for u in urls if _is_local(u) and not os.path.isfile(u)]
    if missing:
        raise DataError(f"data: {len(missing)} of {len(urls)} shards of '{spec}' do not exist, first: {missing[0]}")
    _check_protocols(urls)
    # a dataset dir's sizes.json must be readable when it is there; a pattern's is a nicety
    sizes = _sizes_for(urls, remote, strict=bool(meta))
    num_samples = sum(sizes.values()) if len(sizes) == len(urls) else None
    if meta and split in meta.get("splits", {}):
        num_samples = meta["splits"][split].get("num_samples", num_samples)
    return ShardSet(urls=urls, num_samples=num_samples, sizes=sizes, meta=meta, spec=spec)
