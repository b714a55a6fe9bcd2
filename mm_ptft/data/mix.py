"""Weighted mixtures of training sources, sample by sample, deterministic and exactly resumable.

``data.train`` is one source (a dataset dir or shard pattern) or a list of weighted ones. Each source keeps its
own shard stream (:mod:`mm_ptft.data.stream`: epochs of its own shards, or draws with replacement when
``data.resampled``), split over the same logical workers; a logical worker interleaves its streams by drawing,
for each raw sample, the source it comes from with probability ``weight / sum(weights)``.

The draws are a pure function of (seed, worker, draw index): draw ``j`` is element ``j % BLOCK`` of a seeded
block of choices, so a worker's position in a mixture is just ``(draws, (group, offset) of each source)`` and a
resumed run continues with exactly the samples an uninterrupted run would have read. A source whose shards are
exhausted never happens (streams are infinite); one whose shards are all unreadable stops the run with the
:class:`DataError` of its stream. The weights apply to raw draws: a source's bad samples are skipped after it was
drawn, so its share of *good* samples is lower by its bad fraction (the per-source counts in the metrics show it).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from mm_ptft.config import DataConfig, SourceConfig
from mm_ptft.data.shards import DataError, ShardSet, resolve_shards
from mm_ptft.data.stream import ErrorCallback, StreamSpec, worker_stream

BLOCK = 4096  # draws per seeded block of source choices

# a worker's position in a mixture: (draws so far, ((group, offset) of source 0), (… of source 1), …)
MixPosition = tuple[int, tuple[tuple[int, int], ...]]


@dataclass
class Source:
    """One resolved source of ``data.train``."""

    name: str
    shards: ShardSet
    weight: float = 1.0


def _default_name(path: str) -> str:
    """A readable name from a dataset dir or pattern: the last path part without braces, ``.tar`` or split dirs."""
    stem = re.split(r"[{*?\[]", path.rstrip("/"))[0].rstrip("/")
    parts = [p for p in re.split(r"[/:]+", stem) if p]
    while parts and (
        parts[-1].endswith(".tar") or parts[-1] in ("train", "test", "val", "shards") or parts[-1].startswith("shard")
    ):
        parts.pop()
    return parts[-1] if parts else "source"


def _entries(cfg: DataConfig) -> list[SourceConfig]:
    """``cfg.train`` as a list of sources (a single path is one source of weight 1; none when it is unset)."""
    if cfg.train is None:
        return []
    return cfg.train if isinstance(cfg.train, list) else [SourceConfig(path=cfg.train)]


def source_paths(cfg: DataConfig) -> list[tuple[str, str]]:
    """(path, split) of every source of ``cfg.train`` (none when it is unset)."""
    return [(e.path, e.split or cfg.train_split) for e in _entries(cfg)]


def resolve_sources(cfg: DataConfig) -> list[Source]:
    """The sources of ``cfg.train`` with their shards resolved (local shards checked to exist).

    Raises:
        DataError: a source's shards cannot be found (the message names the source), or two sources have the same
            name (give them ``name:``).
    """
    entries = _entries(cfg)
    sources = []
    for i, entry in enumerate(entries):
        try:
            shards = resolve_shards(entry.path, entry.split or cfg.train_split, cfg.remote)
        except DataError as e:
            if len(entries) == 1:
                raise
            raise DataError(f"data.train[{i}] ({entry.path}): {str(e).removeprefix('data: ')}") from None
        name = entry.name or shards.meta.get("name") or _default_name(entry.path)
        sources.append(Source(name=str(name), shards=shards, weight=float(entry.weight)))
    names = [s.name for s in sources]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise DataError(
            f"data.train: two sources are named '{duplicated[0]}'; give each a distinct `name:` (names key the "
            "per-source counts in metrics and the resume state)"
        )
    return sources


def mixture_samples(sources: list[Source]) -> int | None:
    """Samples in one pass over every source (the mixture's epoch length); None if any size is unknown."""
    sizes = [s.shards.num_samples for s in sources]
    return None if any(n is None for n in sizes) else int(sum(sizes))


def source_seed(seed: int, index: int, n_sources: int) -> int:
    """The shard-stream seed of source ``index``: the run's seed for a single source (its stream is unchanged by
    this module), a distinct one per source of a mixture."""
    if n_sources == 1:
        return seed
    return int(np.random.SeedSequence([seed, index, 0x31C5]).generate_state(1, dtype=np.uint64)[0] >> 1)


@lru_cache(maxsize=16)
def _choice_block(seed: int, worker: int, block: int, probs: tuple[float, ...]) -> np.ndarray:
    rng = np.random.default_rng([seed, worker, block, 0x313])
    return rng.choice(len(probs), size=BLOCK, p=np.asarray(probs))


def source_at(seed: int, worker: int, draw: int, probs: tuple[float, ...]) -> int:
    """The source of draw ``draw`` of logical worker ``worker``."""
    block, index = divmod(draw, BLOCK)
    return int(_choice_block(seed, worker, block, probs)[index])


def mixture_stream(
    specs: list[StreamSpec],
    weights: list[float],
    worker: int,
    start: MixPosition,
    on_errors: list[ErrorCallback],
    seed: int,
) -> Iterator[tuple[dict, int, MixPosition]]:
    """Infinite raw samples of logical worker ``worker`` drawn from ``specs`` in proportion to ``weights``.

    Yields ``(sample, source index, position_after)``; resuming at ``position_after`` continues with the next
    draw. Each source's stream reports its read errors to its own ``on_errors[i]``.
    """
    total = float(sum(weights))
    probs = tuple(w / total for w in weights)
    draws, positions = start[0], list(start[1])
    if len(positions) != len(specs):
        raise DataError(f"data: a mixture position has {len(positions)} sources, the mixture {len(specs)}")
    streams = [
        worker_stream(spec, worker, tuple(pos), on_errors[i]) for i, (spec, pos) in enumerate(zip(specs, positions))
    ]
    while True:
        i = source_at(seed, worker, draws, probs)
        sample, positions[i] = next(streams[i])
        draws += 1
        yield sample, i, (draws, tuple(positions))


def mixture_specs(sources: list[Source], base: StreamSpec) -> list[StreamSpec]:
    """One stream spec per source: ``base``'s layout and options with the source's shards and seed."""
    return [
        dataclasses.replace(base, urls=tuple(s.shards.urls), seed=source_seed(base.seed, i, len(sources)))
        for i, s in enumerate(sources)
    ]


def start_position(n_sources: int) -> MixPosition:
    return 0, tuple((0, 0) for _ in range(n_sources))
