"""Write Debian's ``fortunes`` quotes as a topic-classification text dataset with a fixed train/test split.

Each topic file under ``/usr/share/games/fortunes`` holds quotes separated by lines of ``%``; the topic is the
label. The split is fixed by ``(seed, topic)``: each topic's quotes, in file order, are permuted with a seeded RNG
and the first ``test_fraction`` of them are the test split — so the same arguments always give the same split.
"""

from __future__ import annotations

import random
import zlib
from pathlib import Path

from data_tools.captions import WriteOptions
from data_tools.shards import DataToolsError
from data_tools.text import write_text_split

DEFAULT_SRC = Path("/usr/share/games/fortunes")
DEFAULT_TOPICS = ("computers", "science", "food", "startrek")
NAME = "fortunes"


def read_quotes(path: Path) -> list[str]:
    """The non-empty quotes of one fortune file (separated by lines holding only ``%``)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataToolsError(f"cannot read {path}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")  # a few old fortune files are Latin-1
    quotes, current = [], []
    for line in text.splitlines():
        if line.strip() == "%":
            quotes.append("\n".join(current).strip())
            current = []
        else:
            current.append(line.rstrip())
    quotes.append("\n".join(current).strip())
    return [q for q in quotes if q]


def split_topic(quotes: list[str], topic: str, test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, test indices) of one topic's quotes, in the order of a seeded permutation whose first
    ``test_fraction`` is the test part."""
    order = list(range(len(quotes)))
    random.Random(seed * 1_000_003 + zlib.crc32(topic.encode())).shuffle(order)
    n_test = round(len(quotes) * test_fraction)
    return order[n_test:], order[:n_test]


def write_fortunes(
    out: Path,
    topics: list[str] | tuple[str, ...] = DEFAULT_TOPICS,
    src: Path = DEFAULT_SRC,
    test_fraction: float = 0.2,
    max_per_topic: int | None = None,
    max_chars: int = 1000,
    options: WriteOptions | None = None,
) -> dict[str, dict]:
    """Write ``train`` and ``test`` splits of the quotes of ``topics`` (label = the topic's position in ``topics``).

    Args:
        out: dataset directory.
        topics: fortune files to use; each is a class.
        src: directory of the fortune files.
        test_fraction: share of each topic's quotes in the test split.
        max_per_topic: keep at most this many quotes per topic (the first of the permuted train and test parts,
            in proportion), for small datasets in tests.
        max_chars: drop longer quotes (a handful of multi-page fortunes).
        options: shard size, seed (of the split and the shuffle), name, overwrite.

    Returns:
        The dataset.json entries of both splits.
    """
    options = options or WriteOptions()
    if not 0 < test_fraction < 1:
        raise DataToolsError(f"--test-fraction must be in (0, 1), got {test_fraction}")
    if len(set(topics)) != len(topics):
        raise DataToolsError(f"duplicate topic in {list(topics)}")
    if not src.is_dir():
        raise DataToolsError(f"{src} not found (apt-get install fortunes)")
    rows: dict[str, list[tuple[int, str, str]]] = {"train": [], "test": []}
    offset = 0
    for topic in topics:
        path = src / topic
        if not path.is_file():
            available = sorted(p.name for p in src.iterdir() if p.is_file() and "." not in p.name)
            raise DataToolsError(f"no fortune topic {topic!r} in {src} (available: {', '.join(available)})")
        quotes = [q for q in read_quotes(path) if len(q) <= max_chars]
        train, test = split_topic(quotes, topic, test_fraction, options.seed)
        if max_per_topic is not None:
            n_test = round(max_per_topic * test_fraction)
            train, test = train[: max_per_topic - n_test], test[:n_test]
        for split, indices in (("train", train), ("test", test)):
            rows[split] += [(offset + i, quotes[i], topic) for i in sorted(indices)]
        offset += len(quotes)
    options.name = options.name or NAME
    return {
        split: write_text_split(out, split, split_rows, list(topics), f"fortunes:{src}", options)
        for split, split_rows in rows.items()
    }
