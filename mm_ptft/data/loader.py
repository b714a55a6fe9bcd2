"""Batches for training (infinite, shuffled, exactly resumable) and evaluation (finite, split across ranks).

A training batch is a dict::

    image          (B, C, H, W) float32, normalised
    input_ids      (B, L) long          attention_mask (B, L) long
    label          (B,) long (-1 where the shard has no label)
    key            list[str] of sample keys
    (or whatever the task's decoder and collator make of a sample)
    _state         {"worker": logical worker id on this rank, "position": (group, offset) after the batch,
                    "samples": raw samples consumed (good + bad), "bad": {reason: count}}

The trainer feeds each ``_state`` to :class:`DataPosition`, which is what a checkpoint stores; a loader built from
a restored position yields exactly the batches an uninterrupted run would have yielded next.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mm_ptft.config import DataConfig, RemoteConfig
from mm_ptft.data.decode import BadSampleLog
from mm_ptft.data.mix import Source, mixture_specs, mixture_stream, start_position
from mm_ptft.data.shards import DataError, ShardSet
from mm_ptft.data.stream import StreamSpec, read_tar, worker_stream


@dataclass
class DataPosition:
    """Where each logical worker of this rank stands, and how many batches the rank has consumed.

    A worker's position is ``(group, offset)`` in its shard stream for one source, and ``(draws, ((group, offset)
    of each source, …))`` for a mixture (:mod:`mm_ptft.data.mix`); ``sources`` names a mixture's sources, so a
    resume with other sources fails in one line instead of reading other samples."""

    world_size: int
    num_workers: int  # logical workers per rank (max(DataLoader workers, 1))
    batches: int = 0
    positions: dict[int, tuple] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)  # a mixture's source names, in order ([] for one source)

    def update(self, state: dict) -> None:
        # through DataLoader workers a position's tuples arrive as lists: keep them as tuples
        self.positions[int(state["worker"])] = _from_json(state["position"])
        self.batches += 1

    @property
    def rotation(self) -> int:
        # the DataLoader serves workers round-robin from physical worker 0; the next batch is due from logical
        # worker (batches % W), so a resumed loader maps physical worker p to logical (p + rotation) % W
        return self.batches % self.num_workers

    def state_dict(self) -> dict:
        state = {
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "batches": self.batches,
            "positions": {str(k): _to_json(v) for k, v in self.positions.items()},
        }
        if self.sources:
            state["sources"] = list(self.sources)
        return state

    @classmethod
    def from_state_dict(
        cls, state: dict, world_size: int, num_workers: int, sources: Sequence[str] = ()
    ) -> DataPosition:
        if state["world_size"] != world_size or state["num_workers"] != num_workers:
            raise DataError(
                f"data: the checkpoint's stream ran on {state['world_size']} ranks × {state['num_workers']} workers, "
                f"this run has {world_size} × {num_workers}; resume with the same layout to continue the same samples"
            )
        saved = list(state.get("sources", []))
        if saved != list(sources):

            def show(names):
                return ", ".join(names) if names else "one source"

            raise DataError(
                f"data: the checkpoint's stream read [{show(saved)}], this run's data.train has [{show(sources)}]; "
                "resume with the same sources in the same order to continue the same samples"
            )
        positions = {int(k): _from_json(v) for k, v in state["positions"].items()}
        return cls(world_size, num_workers, int(state["batches"]), positions, list(sources))


def _to_json(position: tuple) -> list:
    if isinstance(position[1], (tuple, list)):  # a mixture's (draws, per-source positions)
        return [int(position[0]), [[int(g), int(o)] for g, o in position[1]]]
    return [int(position[0]), int(position[1])]


def _from_json(value: list | tuple) -> tuple:
    if isinstance(value[1], (tuple, list)):
        return int(value[0]), tuple((int(g), int(o)) for g, o in value[1])
    return int(value[0]), int(value[1])


# a worker that has read this many batches' worth of samples without filling half a batch stops (all but ~1 in 2 ×
# STARVED_BATCHES samples are bad): far beyond any data.max_bad_fraction, so it never fires on usable data
STARVED_BATCHES = 16


def _sample_seed(*parts: int) -> int:
    # tuples of ints hash identically in every process (PYTHONHASHSEED only salts str/bytes)
    return hash(parts) & 0x7FFF_FFFF_FFFF_FFFF


class TrainStream(IterableDataset):
    """Infinite training batches of one rank; each DataLoader worker is one logical worker of the stream.

    ``sources`` are the resolved ``data.train`` sources: one is read as its shard stream, several are mixed by
    weight (:mod:`mm_ptft.data.mix`). Each batch's ``_state`` carries, besides the position, the raw samples and bad
    samples read per source (``sources: {name: {"samples", "bad"}}``)."""

    def __init__(
        self,
        sources: list[Source] | ShardSet,
        cfg: DataConfig,
        decode: Callable[[dict, BadSampleLog, torch.Generator], dict | None],
        collate: Callable[[list[dict]], dict],
        seed: int,
        rank: int,
        position: DataPosition,
    ):
        if isinstance(sources, ShardSet):
            sources = [Source(name="train", shards=sources)]
        self.sources, self.cfg, self.decode, self.collate = sources, cfg, decode, collate
        self.seed, self.rank, self.position = seed, rank, position

    def _raw(self, logical: int, local: int, logs: list[BadSampleLog]) -> Iterator[tuple[dict, int, tuple, tuple]]:
        """(raw sample, source index, position after it, the sample's augmentation seed parts)."""
        base = StreamSpec(
            urls=tuple(self.sources[0].shards.urls),
            seed=self.seed,
            n_workers=self.position.world_size * self.position.num_workers,
            group_size=self.cfg.shuffle_group,
            shuffle=self.cfg.shuffle,
            resampled=self.cfg.resampled,
            remote=self.cfg.remote,
        )
        if len(self.sources) == 1:  # the plain shard stream: positions and samples as before mixtures existed
            start = self.position.positions.get(local, (0, 0))
            for raw, position in worker_stream(base, logical, start, logs[0]):
                yield raw, 0, position, position
            return
        specs = mixture_specs(self.sources, base)
        start = self.position.positions.get(local, start_position(len(specs)))
        weights = [s.weight for s in self.sources]
        for raw, i, position in mixture_stream(specs, weights, logical, start, logs, self.seed):
            yield raw, i, position, (i, *position[1][i])

    def _raise_starved(self, read: int, kept: int, logs: list[BadSampleLog]) -> None:
        """Nearly every sample since the last batch was bad: stop in one line instead of reading forever (the
        trainer's ``max_bad_fraction`` check runs per batch, and no batch is coming)."""
        reasons: Counter = Counter()
        for log in logs:
            reasons.update(log.counts)
        shown = ", ".join(f"{k} {v}" for k, v in reasons.most_common())
        raise DataError(
            f"data: {read - kept} of the last {read} samples were bad ({shown}) and no batch of "
            f"{self.cfg.batch_size} could be made; check the shards with `python -m data_tools verify "
            + " / ".join(s.shards.spec for s in self.sources)
            + "`"
        )

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        n_local = self.position.num_workers
        physical = info.id if info is not None else 0
        local = (physical + self.position.rotation) % n_local
        logical = self.rank * n_local + local
        logs = [BadSampleLog() for _ in self.sources]
        items: list[dict] = []
        consumed = [0] * len(self.sources)
        for raw, source, position, where in self._raw(logical, local, logs):
            consumed[source] += 1
            # augmentation randomness is a function of the sample's stream position: identical after a resume, and
            # drawn from the sample's own generator, so decoding in the training process (workers=0) leaves its RNG
            # (dropout, drop-path) alone
            generator = torch.Generator().manual_seed(_sample_seed(self.seed, logical, *where))
            decoded = self.decode(raw, logs[source], generator)
            if decoded is None:
                read = sum(consumed)
                if read >= STARVED_BATCHES * self.cfg.batch_size and len(items) < self.cfg.batch_size // 2:
                    self._raise_starved(read, len(items), logs)
                continue
            items.append(decoded)
            if len(items) == self.cfg.batch_size:
                batch = self.collate(items)
                bad: Counter = Counter()
                per_source = {}
                for s, log, n in zip(self.sources, logs, consumed):
                    counts = log.take()
                    bad.update(counts)
                    # a shard that fails to open or breaks off counts as one sample read (and bad)
                    read = n + sum(v for k, v in counts.items() if k in ("tar_error", "shard_open_error"))
                    per_source[s.name] = {"samples": read, "bad": sum(counts.values())}
                batch["_state"] = {
                    "worker": local,
                    "position": position,
                    "samples": sum(v["samples"] for v in per_source.values()),
                    "bad": dict(bad),
                    "sources": per_source,
                }
                yield batch
                items, consumed = [], [0] * len(self.sources)


class EvalStream(IterableDataset):
    """Held-out samples in shard order; sample i belongs to global worker i % (ranks × workers). Finite."""

    def __init__(
        self,
        shards: ShardSet,
        decode: Callable[[dict, BadSampleLog], dict | None],
        collate: Callable[[list[dict]], dict],
        batch_size: int,
        rank: int,
        world_size: int,
        num_workers: int,
        max_samples: int | None = None,
        remote: RemoteConfig | None = None,
    ):
        self.shards, self.decode, self.collate = shards, decode, collate
        self.batch_size, self.rank, self.world_size, self.num_workers = batch_size, rank, world_size, num_workers
        self.max_samples, self.remote = max_samples, remote

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        n_global = self.world_size * self.num_workers
        mine = self.rank * self.num_workers + worker
        log = BadSampleLog()
        items: list[dict] = []
        index = 0
        for url in self.shards.urls:
            for raw in read_tar(url, log, self.remote):
                if self.max_samples is not None and index >= self.max_samples:
                    break
                index += 1
                if (index - 1) % n_global != mine:
                    continue
                decoded = self.decode(raw, log)
                if decoded is not None:
                    items.append(decoded)
                if len(items) == self.batch_size:
                    yield {**self.collate(items), "_bad": log.take()}
                    items = []
        if items:
            yield {**self.collate(items), "_bad": log.take()}


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def make_loader(dataset: IterableDataset, workers: int, prefetch: int) -> DataLoader:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers are forked after the tokenizer is used
    kwargs = {"prefetch_factor": prefetch, "worker_init_fn": _worker_init} if workers > 0 else {}
    # an own generator: creating the iterator must not draw from the global RNG, or a resumed run's dropout noise
    # would drift from the uninterrupted run's (sample randomness is seeded by stream position instead)
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        persistent_workers=False,
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    )
