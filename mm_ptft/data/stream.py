"""The deterministic, resumable raw-sample stream of one logical data worker.

Every sample a run sees is a pure function of (seed, shard list, number of logical workers, position):

* **Shard stream.** An infinite sequence of shards: epoch ``e`` is a seeded permutation of all shards (or, with
  ``resampled``, ``len(shards)`` draws with replacement). Element ``k`` of the stream goes to logical worker
  ``k % n_workers`` (logical workers = ranks × DataLoader workers), so within an epoch every rank, node and worker
  reads disjoint shards, and no worker ever starves, whatever the shard count (the assignment rotates by epoch).
* **Shuffle groups.** A worker reads its shards of an epoch ``group_size`` at a time into memory and emits them in
  a seeded permutation; groups never straddle epochs, so an epoch's samples stay disjoint across workers. A
  worker's position is just ``(group, offset)``: resuming re-reads one group and skips ``offset`` samples, instead
  of replaying the whole stream or pickling a shuffle buffer. A group of G shards shuffles as well as a buffer of
  that many samples, at the price of holding those shards' raw bytes in memory.

Errors while reading (a shard that fails to open, a truncated tar) are reported to a callback and skipped; the
samples that were read before the damage are kept, so the stream stays deterministic for the same files.
"""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from mm_ptft.config import RemoteConfig

# webdataset's key rule: the key is the path up to the first '.' of the basename; the rest is the field name.
_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")

ErrorCallback = Callable[[str, str, str], None]  # (reason, shard url, key or '') → None


@dataclass(frozen=True)
class StreamSpec:
    urls: tuple[str, ...]
    seed: int
    n_workers: int  # logical workers across all ranks
    group_size: int = 2
    shuffle: bool = True
    resampled: bool = False
    remote: RemoteConfig | None = None  # timeouts and retries for remote shards (None → RemoteConfig defaults)


@lru_cache(maxsize=8)
def _epoch_order(n_urls: int, seed: int, epoch: int, shuffle: bool, resampled: bool) -> np.ndarray:
    rng = np.random.default_rng([seed, epoch, 0x5EED])
    if resampled:
        return rng.integers(0, n_urls, size=n_urls)
    return rng.permutation(n_urls) if shuffle else np.arange(n_urls)


def shard_at(spec: StreamSpec, k: int) -> str:
    """The ``k``-th shard of the infinite shard stream."""
    n = len(spec.urls)
    epoch, index = divmod(k, n)
    return spec.urls[int(_epoch_order(n, spec.seed, epoch, spec.shuffle, spec.resampled)[index])]


def _count_in_epoch(spec: StreamSpec, worker: int, epoch: int) -> int:
    """How many of epoch ``epoch``'s shards go to ``worker``: stream positions in [eS, eS+S) ≡ worker (mod n)."""
    n, first = spec.n_workers, epoch * len(spec.urls)
    return (first + len(spec.urls) - 1 - worker) // n - (first - 1 - worker) // n


def group_shards(spec: StreamSpec, worker: int, group: int) -> list[str]:
    """The shards of shuffle group ``group`` of logical worker ``worker`` (groups are numbered across epochs)."""
    epoch = 0
    while True:
        count = _count_in_epoch(spec, worker, epoch)
        n_groups = -(-count // spec.group_size)
        if group < n_groups:
            break
        group -= n_groups
        epoch += 1
    n = len(spec.urls)
    first = epoch * n + (worker - epoch * n) % spec.n_workers  # this worker's first stream position in the epoch
    positions = range(first, (epoch + 1) * n, spec.n_workers)
    return [shard_at(spec, k) for k in positions[group * spec.group_size : (group + 1) * spec.group_size]]


def split_key(name: str) -> tuple[str, str] | None:
    match = _KEY_RE.match(name)
    return (match.group(1), match.group(2).lower()) if match else None


def read_tar(url: str, on_error: ErrorCallback, remote: RemoteConfig | None = None) -> Iterator[dict]:
    """Yield raw samples ``{"__key__", "__url__", field: bytes}`` of one shard, grouping members by key.

    Local paths, ``pipe:`` commands, http(s):// and fsspec URLs are opened by :func:`mm_ptft.data.remote.open_shard`,
    which retries network faults (resuming at the byte it stopped at) within ``remote``'s bounds. A shard that still
    cannot be opened is reported as ``shard_open_error``; one that fails part-way as ``tar_error``, after the
    samples read before the damage.
    """
    from mm_ptft.data.remote import ShardReadError, open_shard

    try:
        stream = open_shard(url, remote)
    except Exception as e:  # noqa: BLE001 - any open failure is a skipped shard, reported with its reason
        on_error("shard_open_error", url, e.detail if isinstance(e, ShardReadError) else f"{type(e).__name__}: {e}")
        return
    current: dict | None = None
    try:
        with stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                parts = split_key(member.name)
                if parts is None or os.path.basename(member.name).startswith("."):
                    continue
                key, field = parts
                data = tar.extractfile(member).read()
                if len(data) != member.size:  # the stream ended inside the member: tarfile returns it short
                    raise tarfile.ReadError(f"the stream ends inside {member.name} ({len(data)}/{member.size} bytes)")
                if current is None or current["__key__"] != key:
                    if current is not None:
                        yield current
                    current = {"__key__": key, "__url__": url}
                current[field] = data
            # tarfile ends quietly when the stream stops inside a header or right after a member; a whole
            # (uncompressed) tar has at least one zero block after its last member
            if getattr(tar.fileobj, "comptype", None) == "tar" and stream.tell() < tar.offset + tarfile.BLOCKSIZE:
                raise tarfile.ReadError(f"the stream ends at byte {stream.tell()}, before the end-of-archive block")
    except ShardReadError as e:
        # the retries ran out: nothing delivered is a shard that could not be opened (e.g. a pipe: command that
        # failed); otherwise keep what was read, as for a truncated tar
        on_error("shard_open_error" if e.delivered == 0 else "tar_error", url, e.detail)
        return
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        # a truncated or corrupt tar: keep what was read, drop the partial sample being read, report the shard
        on_error("tar_error", url, f"{type(e).__name__}: {e}")
        return
    if current is not None:
        yield current


def worker_stream(
    spec: StreamSpec, worker: int, start: tuple[int, int], on_error: ErrorCallback
) -> Iterator[tuple[dict, tuple[int, int]]]:
    """Infinite raw samples of logical worker ``worker`` from position ``start = (group, offset)``.

    Yields ``(sample, position_after)``: resuming at ``position_after`` continues with the next sample.
    """
    group, offset = start
    empty_groups = 0
    while True:
        samples = [s for url in group_shards(spec, worker, group) for s in read_tar(url, on_error, spec.remote)]
        empty_groups = 0 if samples else empty_groups + 1
        if empty_groups * spec.group_size > 2 * len(spec.urls) + spec.group_size:
            # every shard has come round at least twice without a sample: nothing is readable
            from mm_ptft.data.shards import DataError

            raise DataError(f"data: no readable samples in any of {len(spec.urls)} shards (first: {spec.urls[0]})")
        if spec.shuffle and samples:
            order = np.random.default_rng([spec.seed, worker, group, 0x5A]).permutation(len(samples))
            samples = [samples[i] for i in order]
        for i in range(offset, len(samples)):
            yield samples[i], (group, i + 1)
        group, offset = group + 1, 0
