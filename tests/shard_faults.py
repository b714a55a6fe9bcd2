"""Helpers that damage shards the way real storage and pipelines do (for data-fault tests)."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable
from pathlib import Path


def rewrite_shard(path: Path, edit: Callable[[str, bytes], bytes | None]) -> None:
    """Rewrite a tar member by member; ``edit(name, data)`` returns new bytes, or None to drop the member."""
    members = []
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            members.append((m.name, tar.extractfile(m).read()))
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            new = edit(name, data)
            if new is None:
                continue
            info = tarfile.TarInfo(name)
            info.size = len(new)
            tar.addfile(info, io.BytesIO(new))


def member_names(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


def corrupt_image(path: Path, key: str) -> None:
    rewrite_shard(
        path, lambda n, d: b"\x89PNG\r\n\x1a\n garbage" if n.startswith(key + ".") and n.endswith("png") else d
    )


def drop_caption(path: Path, key: str) -> None:
    rewrite_shard(path, lambda n, d: None if n == key + ".txt" else d)


def truncate(path: Path, fraction: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
