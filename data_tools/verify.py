"""Check webdataset shards: every tar readable, every image decodable, captions and metadata present, counts right."""

from __future__ import annotations

import glob
import io
import json
import sys
import tarfile
import warnings
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, TextIO

from braceexpand import braceexpand
from PIL import Image
from tqdm import tqdm

from data_tools.shards import DATASET_JSON, SIZES_JSON, DataToolsError, existing_shards, read_json

IMAGE_EXTS = {"jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "ppm", "pgm"}
SHARD_LEVEL = "-"  # key used for problems that belong to a whole shard or file rather than one sample
MAX_LINES = 50
_TAR_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)
_END_OF_ARCHIVE = 1024  # two zero blocks


class BadSample(NamedTuple):
    """One problem: ``key`` is the sample key, or ``"-"`` for a problem with a whole shard or file."""

    shard: str
    key: str
    reason: str


@dataclass
class SplitStats:
    """Counts for one split (or one pattern) that was verified."""

    shards: int = 0
    samples: int = 0
    bad_samples: int = 0


@dataclass
class VerifyReport:
    """Result of ``verify_dataset``.

    Attributes:
        splits: Counts per split name (or per pattern, when a pattern was given).
        bad: Every problem found, as ``(shard, key, reason)``; ``reason`` starts with a short category
            (``"bad image: ..."``, ``"missing caption"``, ``"tar error: ..."``, ``"count mismatch: ..."``).
    """

    splits: dict[str, SplitStats] = field(default_factory=dict)
    bad: list[BadSample] = field(default_factory=list)

    @property
    def num_shards(self) -> int:
        """Shards read, over all splits."""
        return sum(s.shards for s in self.splits.values())

    @property
    def num_samples(self) -> int:
        """Complete samples read, over all splits."""
        return sum(s.samples for s in self.splits.values())

    @property
    def num_bad_samples(self) -> int:
        """Distinct samples with at least one problem."""
        return len({(b.shard, b.key) for b in self.bad if b.key != SHARD_LEVEL})

    @property
    def ok(self) -> bool:
        """True when no problem of any kind was found."""
        return not self.bad

    def reason_counts(self) -> Counter[str]:
        """Count problems by category (the part of the reason before the first ``:``)."""
        return Counter(b.reason.split(":", 1)[0] for b in self.bad)


@dataclass
class ShardSet:
    """Shards to check as one group, with the counts they are expected to hold."""

    name: str
    shards: list[Path]
    # Per-shard sample counts from sizes.json; None where there is no sizes.json to check against.
    sizes: dict[Path, int | None]
    problems: list[BadSample] = field(default_factory=list)
    expected_total: int | None = None
    total_source: str = ""


def _split_member(name: str) -> tuple[str, str]:
    # webdataset convention: the key is the path up to the first dot of the file name, the rest is the field.
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def _tail_is_end_marker(path: Path, offset: int) -> bool:
    with open(path, "rb") as f:
        f.seek(offset)
        tail = f.read()
    return len(tail) >= _END_OF_ARCHIVE and not tail.strip(b"\0")


class BrokenTarError(Exception):
    """A tar could not be read to its end; ``key`` is the sample it broke inside (``None``: between samples)."""

    def __init__(self, key: str | None, cause: BaseException) -> None:
        super().__init__(str(cause) or type(cause).__name__)
        self.key = key


def iter_tar_samples(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(key, {ext: bytes})`` for each complete sample of a tar file, in order.

    Raises:
        BrokenTarError: The tar is unreadable, cut off, or corrupt; the samples before the break were yielded.
    """
    key, files = None, {}
    try:
        with tarfile.open(path, mode="r|*") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                member_key, ext = _split_member(member.name)
                if member_key != key and key is not None:
                    yield key, files
                    files = {}
                key = member_key
                files[ext] = tf.extractfile(member).read()
            end = tf.offset
    except _TAR_ERRORS as exc:
        raise BrokenTarError(key, exc) from exc
    if key is not None:
        yield key, files
    # tarfile quietly stops at a cut-off header, so a file cut between members is only visible at its end.
    if path.suffix == ".tar" and not _tail_is_end_marker(path, end):
        raise BrokenTarError(None, EOFError("cut off: no end-of-archive marker"))


def _image_problem(ext: str, data: bytes) -> str | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as image:
                image.load()
    # Broad on purpose: PIL raises many unrelated exception types for corrupt data.
    except Exception as exc:
        return f"bad image: {ext} does not decode ({type(exc).__name__}: {exc})"
    return None


def _caption_problem(data: bytes | None) -> str | None:
    if data is None:
        return "missing caption"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return "bad caption: not UTF-8"
    return None if text.strip() else "empty caption"


def _json_problem(data: bytes | None) -> str | None:
    if data is None:
        return "missing json"
    try:
        meta = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"bad json: {exc}"
    return None if isinstance(meta, dict) else "bad json: not an object"


def sample_problems(files: dict[str, bytes]) -> list[str]:
    """Return every problem of one sample given as ``{ext: bytes}`` (empty list when it is fine)."""
    problems = []
    images = [ext for ext in files if ext in IMAGE_EXTS]
    if not images:
        problems.append("missing image")
    problems += [p for ext in images if (p := _image_problem(ext, files[ext]))]
    problems += [p for p in (_caption_problem(files.get("txt")), _json_problem(files.get("json"))) if p]
    return problems


def _verify_shard(path: Path, seen: set[str], stats: SplitStats, bad: list[BadSample]) -> int:
    """Check one shard, appending problems to ``bad``; return the number of complete samples in it."""
    shard, count = str(path), 0
    try:
        for key, files in iter_tar_samples(path):
            count += 1
            problems = sample_problems(files)
            if key in seen:
                problems.append("duplicate key")
            seen.add(key)
            bad += [BadSample(shard, key, p) for p in problems]
            stats.bad_samples += bool(problems)
    except BrokenTarError as exc:
        bad.append(BadSample(shard, exc.key or SHARD_LEVEL, f"tar error: {exc}"))
        stats.bad_samples += exc.key is not None
    return count


def _check_set(shard_set: ShardSet, report: VerifyReport, progress: bool) -> None:
    stats = report.splits.setdefault(shard_set.name, SplitStats())
    report.bad += shard_set.problems
    seen: set[str] = set()
    total = 0
    for path in tqdm(shard_set.shards, desc=f"verify {shard_set.name}", unit="shard", disable=not progress):
        if not path.is_file():
            report.bad.append(BadSample(str(path), SHARD_LEVEL, "missing shard file"))
            continue
        count = _verify_shard(path, seen, stats, report.bad)
        stats.shards += 1
        total += count
        expected = shard_set.sizes.get(path)
        if expected is not None and expected != count:
            report.bad.append(
                BadSample(str(path), SHARD_LEVEL, f"count mismatch: sizes.json says {expected}, found {count}")
            )
    stats.samples += total
    if shard_set.expected_total is not None and shard_set.expected_total != total:
        reason = f"count mismatch: num_samples is {shard_set.expected_total}, found {total}"
        report.bad.append(BadSample(shard_set.total_source, SHARD_LEVEL, reason))


def _sizes_for(shards: list[Path], split_dir: Path | None, problems: list[BadSample]) -> dict[Path, int | None]:
    """Map each shard to its sizes.json count, else to the ``successes`` of img2dataset's ``<stem>_stats.json`` next
    to it; with ``split_dir`` set, a dir with neither is a problem."""
    sizes: dict[Path, int | None] = {}
    cache: dict[Path, dict | None] = {}
    for path in shards:
        sizes_path = path.parent / SIZES_JSON
        if sizes_path not in cache:
            cache[sizes_path] = read_json(sizes_path) if sizes_path.is_file() else None
        listed = cache[sizes_path]
        if listed is not None and path.name not in listed:
            problems.append(BadSample(str(path), SHARD_LEVEL, "count mismatch: shard not listed in sizes.json"))
        sizes[path] = None if listed is None else listed.get(path.name)
        stats_path = path.with_name(f"{path.stem}_stats.json")
        if listed is None and stats_path.is_file():
            successes = read_json(stats_path).get("successes")
            if isinstance(successes, int) and not isinstance(successes, bool):
                sizes[path] = successes
            else:
                problems.append(BadSample(str(stats_path), SHARD_LEVEL, "bad _stats.json: no integer 'successes'"))
    if split_dir is not None:
        listed = cache.get(split_dir / SIZES_JSON)
        if listed is None:
            if any(sizes[p] is None for p in shards):  # neither sizes.json nor img2dataset's counts
                problems.append(BadSample(str(split_dir / SIZES_JSON), SHARD_LEVEL, "missing sizes.json"))
        else:
            names = {p.name for p in shards}
            problems += [
                BadSample(str(split_dir / n), SHARD_LEVEL, "missing shard file") for n in listed if n not in names
            ]
    return sizes


def _split_dir_set(name: str, split_dir: Path) -> ShardSet:
    shards = existing_shards(split_dir) or sorted(split_dir.glob("*.tar"))
    problems: list[BadSample] = []
    return ShardSet(name, shards, _sizes_for(shards, split_dir, problems), problems)


def _dataset_sets(root: Path, split: str | None) -> list[ShardSet]:
    meta = read_json(root / DATASET_JSON)
    splits = meta.get("splits") or {}
    if split is not None and split not in splits:
        raise DataToolsError(f"split {split!r} not in {root / DATASET_JSON} (has: {', '.join(splits) or 'none'})")
    sets = []
    for name, entry in splits.items():
        if split is not None and name != split:
            continue
        shards = [root / p for p in braceexpand(entry["pattern"])]
        split_dir = root / name
        problems: list[BadSample] = []
        extra = sorted(set(existing_shards(split_dir)) - set(shards))
        problems += [BadSample(str(p), SHARD_LEVEL, "count mismatch: shard not in dataset.json pattern") for p in extra]
        if entry.get("num_shards") is not None and entry["num_shards"] != len(shards):
            reason = f"count mismatch: num_shards is {entry['num_shards']}, pattern has {len(shards)}"
            problems.append(BadSample(str(root / DATASET_JSON), SHARD_LEVEL, reason))
        sizes = _sizes_for(shards, split_dir, problems)
        sets.append(ShardSet(name, shards, sizes, problems, entry.get("num_samples"), str(root / DATASET_JSON)))
    return sets


def _directory_sets(root: Path, split: str | None) -> list[ShardSet]:
    if (root / DATASET_JSON).is_file():
        return _dataset_sets(root, split)
    if split is not None:
        if not (root / split).is_dir():
            raise DataToolsError(f"split directory {root / split} not found")
        return [_split_dir_set(split, root / split)]
    if existing_shards(root) or any(root.glob("*.tar")):
        return [_split_dir_set(root.name, root)]
    return [_split_dir_set(d.name, d) for d in sorted(root.iterdir()) if d.is_dir() and any(d.glob("*.tar"))]


def _pattern_set(pattern: str) -> ShardSet:
    names = [p for expanded in braceexpand(pattern) for p in (sorted(glob.glob(expanded)) or [expanded])]
    shards = [Path(n) for n in names]
    if not any(p.is_file() for p in shards):
        raise DataToolsError(f"no shard files match {pattern}")
    problems: list[BadSample] = []
    return ShardSet(pattern, shards, _sizes_for([p for p in shards if p.is_file()], None, problems), problems)


def resolve_targets(path_or_pattern: str | Path, split: str | None = None) -> list[ShardSet]:
    """Work out which shards to check for a dataset directory, a split directory, a shard file or a pattern.

    Raises:
        DataToolsError: The path does not exist, no shards are found, or ``split`` is unknown.
    """
    text = str(path_or_pattern)
    path = Path(text)
    if path.is_dir():
        sets = _directory_sets(path, split)
        if not any(s.shards for s in sets):
            raise DataToolsError(f"no shards found in {path}")
        return sets
    if path.is_file() or any(c in text for c in "{*?["):
        return [_pattern_set(text)]
    raise DataToolsError(f"{text} not found")


def verify_dataset(path_or_pattern: str | Path, split: str | None = None, progress: bool = False) -> VerifyReport:
    """Read every shard of a dataset and check every sample.

    Checks: each tar reads to its end-of-archive marker; each image decodes with PIL; each sample has a non-empty
    UTF-8 caption under ``txt`` and a JSON object under ``json``; keys are unique within a split; ``sizes.json``
    and ``dataset.json`` counts match what the shards hold.

    Args:
        path_or_pattern: A dataset directory (``OUT``), a split directory, one shard, or a brace/glob pattern.
        split: With a dataset directory, check only this split.
        progress: Show a progress bar per split.

    Returns:
        The counts and every problem found.

    Raises:
        DataToolsError: The path does not exist or holds no shards (a usage error, not a data problem).
    """
    report = VerifyReport()
    for shard_set in resolve_targets(path_or_pattern, split):
        _check_set(shard_set, report, progress)
    return report


def print_report(report: VerifyReport, stream: TextIO | None = None, max_lines: int = MAX_LINES) -> None:
    """Print a summary table, the problem counts by reason, and the problems as ``shard key reason``."""
    stream = stream or sys.stdout
    width = max([len("total")] + [len(name) for name in report.splits])
    print(f"{'split':<{width}}  {'shards':>7}  {'samples':>9}  {'bad':>7}", file=stream)
    for name, s in report.splits.items():
        print(f"{name:<{width}}  {s.shards:>7}  {s.samples:>9}  {s.bad_samples:>7}", file=stream)
    totals = f"{report.num_shards:>7}  {report.num_samples:>9}  {report.num_bad_samples:>7}"
    print(f"{'total':<{width}}  {totals}", file=stream)
    if report.ok:
        print("OK: no problems found", file=stream)
        return
    print("\nproblems by reason:", file=stream)
    for reason, count in report.reason_counts().most_common():
        print(f"  {reason:<20} {count:>7}", file=stream)
    print("", file=stream)
    for b in report.bad[:max_lines]:
        print(f"{b.shard} {b.key} {b.reason}", file=stream)
    if len(report.bad) > max_lines:
        print(f"... and {len(report.bad) - max_lines} more", file=stream)
