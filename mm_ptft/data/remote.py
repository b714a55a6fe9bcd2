"""Shards wherever they live — a local path, a ``pipe:`` command, an ``http(s)://`` URL, ``s3://`` or another fsspec
URL — opened as one kind of binary stream, with network faults retried and no wait without a timeout.

A remote shard is read through :class:`ResumingStream`. It counts the bytes it has delivered; when a read fails
part-way (connection reset, timeout, a body shorter than announced, HTTP 5xx) it waits ``backoff_s × 2^i`` (at most
30 s) and re-opens the shard at the first byte not yet delivered: an HTTP ``Range: bytes=N-`` request (a server that
answers 200 instead of 206 is read from the start again and the first N bytes are skipped), or an fsspec seek. The
tar reader above it never sees the fault, so a transient fault changes nothing in the stream. After ``retries``
failed attempts it raises :class:`ShardReadError`, which names the URL, the attempts and the last reason. A missing
or forbidden shard (HTTP 404/403/410, ``FileNotFoundError``) fails at once: another attempt would answer the same.

* ``http(s)://``: urllib; ``timeout_s`` bounds the connect and every socket read.
* ``s3://``: s3fs, with botocore's connect and read timeouts set to ``timeout_s`` and its own retries (and
  s3fs's) turned off, so the attempts are counted here only. The endpoint comes from ``AWS_ENDPOINT_URL_S3`` or
  ``AWS_ENDPOINT_URL`` (read at every open, e.g. ``http://127.0.0.1:9000`` for a local S3-compatible server), unless
  fsspec's own configuration sets one (``FSSPEC_S3_ENDPOINT_URL`` at import, or ``~/.config/fsspec/``); credentials
  as boto3 finds them (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``~/.aws``).
* other fsspec protocols (``gs://``, ``az://``, …): their own options from fsspec's configuration, and every open
  and read runs under a ``timeout_s`` deadline, since their timeout settings differ by protocol.
* ``pipe:CMD``: the command runs once, not retried (it may not be safe to run twice; put retries inside it, e.g.
  ``curl --retry``); its output may not stall for longer than ``timeout_s`` and a non-zero exit status is an error.
"""

from __future__ import annotations

import contextlib
import io
import os
import select
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol

from mm_ptft.config import RemoteConfig

MAX_BACKOFF_S = 30.0
BUFFER_BYTES = 1 << 20  # reads from the network are this large; the tar reader's 10 kB reads come from the buffer
S3_PROTOCOLS = ("s3", "s3a")
# answers that another attempt cannot change; anything else (5xx, 408, 429, network errors) is retried
_HTTP_PERMANENT = {400, 401, 403, 404, 405, 410, 414, 416, 451}
_HTTP_MISSING = {404, 410}


class ShardReadError(OSError):
    """A shard that could not be read, after the attempts its :class:`RemoteConfig` allows.

    Attributes:
        url: the shard.
        reason: what the last attempt ran into.
        attempts: how many times the shard was opened (or tried).
        delivered: bytes delivered before giving up (0: nothing of the shard could be read).
        missing: the shard does not exist (HTTP 404/410, ``FileNotFoundError``).
    """

    def __init__(self, url: str, reason: str, attempts: int, delivered: int, missing: bool = False):
        self.url, self.reason, self.attempts, self.delivered, self.missing = url, reason, attempts, delivered, missing
        super().__init__(f"{url}: {self.detail}")

    @property
    def detail(self) -> str:
        """The message without the URL (for logs that name the URL already)."""
        tries = f"{self.attempts} attempt{'' if self.attempts == 1 else 's'}"
        where = f" at byte {self.delivered}" if self.delivered else ""
        return f"gave up after {tries}{where}: {self.reason}"


class _Permanent(Exception):
    """A failure another attempt cannot fix (raised by openers and readers)."""

    def __init__(self, reason: str, missing: bool = False):
        super().__init__(reason)
        self.reason, self.missing = reason, missing


class _Reader(Protocol):
    def read(self, n: int) -> bytes: ...

    def close(self) -> None: ...


@dataclass
class Opened:
    """What an opener returns: a reader positioned at the requested offset, the shard's size and version tag."""

    reader: _Reader
    size: int | None = None  # total bytes of the shard, when the server says
    tag: str | None = None  # ETag / Last-Modified: a shard that changes between attempts is not stitched together


Opener = Callable[[int], Opened]  # offset → reader from that byte on


def _reason(e: BaseException) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError) and isinstance(e.reason, BaseException):
        e = e.reason
    if isinstance(e, TimeoutError) and not str(e):
        return "TimeoutError: timed out"
    return f"{type(e).__name__}: {e}"


class ResumingStream(io.RawIOBase):
    """A read-only stream of one shard that re-opens at the delivered offset when a read fails (see module doc).

    Opening happens in the constructor, so a shard that cannot be opened raises :class:`ShardReadError` there.
    """

    def __init__(self, url: str, open_at: Opener, remote: RemoteConfig, retries: int | None = None):
        super().__init__()
        self.url, self._open_at = url, open_at
        self._retries = remote.retries if retries is None else retries
        self._backoff_s = remote.backoff_s
        self.delivered = 0  # bytes handed to the caller
        self.attempts = 0  # opens tried (the first one included)
        self._reader: _Reader | None = None
        self._size: int | None = None
        self._tag: str | None = None
        self._connect()

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.delivered

    def readinto(self, buffer) -> int:
        want = len(buffer)
        while want:
            if self._reader is None:
                self._connect()
            try:
                data = self._reader.read(want)
            except _Permanent as e:
                self._give_up(e.reason, e.missing)
            except Exception as e:  # noqa: BLE001 - any failed read is worth another attempt from the same byte
                self._failed(_reason(e))
                continue
            if not data:
                if self._size is not None and self.delivered < self._size:
                    self._failed(f"the body ended at byte {self.delivered} of {self._size}")
                    continue
                return 0
            n = len(data)
            buffer[:n] = data
            self.delivered += n
            return n
        return 0

    def close(self) -> None:
        self._close_reader()
        super().close()

    # ------------------------------------------------------------------------------------------------ attempts
    def _connect(self) -> None:
        while self._reader is None:
            self.attempts += 1
            try:
                opened = self._open_at(self.delivered)
            except _Permanent as e:
                self._give_up(e.reason, e.missing)
            except Exception as e:  # noqa: BLE001 - network, server and protocol errors alike: try again
                self._failed(_reason(e))
                continue
            if self._tag is not None and opened.tag is not None and opened.tag != self._tag:
                opened.reader.close()
                self._give_up(f"the shard changed while it was read (version {self._tag} → {opened.tag})")
            if self._size is not None and opened.size is not None and opened.size != self._size:
                opened.reader.close()
                self._give_up(f"the shard changed size while it was read ({self._size} → {opened.size} bytes)")
            self._reader = opened.reader
            self._size = opened.size if opened.size is not None else self._size
            self._tag = opened.tag if opened.tag is not None else self._tag

    def _failed(self, reason: str) -> None:
        """Count a failed attempt: wait before the next one, or give up when none is left."""
        self._close_reader()
        if self.attempts > self._retries:
            self._give_up(reason)
        time.sleep(min(self._backoff_s * 2 ** (self.attempts - 1), MAX_BACKOFF_S))

    def _give_up(self, reason: str, missing: bool = False) -> None:
        self._close_reader()
        raise ShardReadError(self.url, reason, self.attempts, self.delivered, missing)

    def _close_reader(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            with contextlib.suppress(Exception):  # a broken connection may fail to close; it is dropped anyway
                reader.close()


# ---------------------------------------------------------------------------------------------------------------------
# http(s)://
# ---------------------------------------------------------------------------------------------------------------------


def _content_range(value: str | None) -> tuple[int, int | None]:
    """``bytes START-END/TOTAL`` → (START, TOTAL or None for '*')."""
    try:
        unit, _, rest = value.partition(" ")
        span, _, total = rest.partition("/")
        if unit != "bytes":
            raise ValueError(value)
        return int(span.split("-")[0]), None if total == "*" else int(total)
    except (AttributeError, ValueError):
        raise _Permanent(f"unreadable Content-Range {value!r} in a 206 answer") from None


def _skip(reader, n: int) -> None:
    while n:
        chunk = reader.read(min(n, BUFFER_BYTES))
        if not chunk:
            raise OSError(f"the body ended {n} bytes before the resume point")
        n -= len(chunk)


class _HTTPBody:
    def __init__(self, response):
        self._response = response

    def read(self, n: int) -> bytes:
        return self._response.read1(n)  # what has arrived: progress is counted byte by byte, not per MiB

    def close(self) -> None:
        self._response.close()


def http_opener(url: str, timeout_s: float) -> Opener:
    """Open ``url`` at a byte offset with ``Range``; ``timeout_s`` bounds the connect and every read."""

    def open_at(offset: int) -> Opened:
        headers = {"Accept-Encoding": "identity", "User-Agent": "mm-ptft"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s)
        except urllib.error.HTTPError as e:
            e.close()
            if e.code in _HTTP_PERMANENT:
                raise _Permanent(f"HTTP {e.code} {e.reason}", missing=e.code in _HTTP_MISSING) from None
            raise
        except ValueError as e:  # a malformed URL (http.client.InvalidURL is one): no attempt can fix it
            raise _Permanent(_reason(e)) from None
        try:
            tag = response.headers.get("ETag") or response.headers.get("Last-Modified")
            length = response.headers.get("Content-Length")
            if response.status == 206:
                start, size = _content_range(response.headers.get("Content-Range"))
                if start != offset:
                    raise _Permanent(f"asked for bytes {offset}-, the server sent bytes {start}-")
            else:  # the whole body: a server that ignores Range is read again and the delivered bytes skipped
                size = int(length) if length is not None and length.isdigit() else None
                _skip(response, offset)
        except BaseException:
            response.close()
            raise
        return Opened(_HTTPBody(response), size, tag)

    return open_at


# ---------------------------------------------------------------------------------------------------------------------
# s3:// and other fsspec protocols
# ---------------------------------------------------------------------------------------------------------------------


def storage_options(protocol: str, remote: RemoteConfig) -> dict[str, Any]:
    """fsspec options that make a protocol's waits bounded by ``remote.timeout_s`` and its retries ours."""
    if protocol not in S3_PROTOCOLS:
        return {}
    import fsspec.config

    configured = fsspec.config.conf.get("s3", {})
    config_kwargs = {
        **configured.get("config_kwargs", {}),
        "connect_timeout": remote.timeout_s,
        "read_timeout": remote.timeout_s,
        "retries": {"total_max_attempts": 1},  # botocore retries nothing: the attempts are counted here
    }
    options: dict[str, Any] = {"config_kwargs": config_kwargs}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and "endpoint_url" not in configured and "endpoint_url" not in configured.get("client_kwargs", {}):
        options["endpoint_url"] = endpoint  # explicit, so fsspec's cached filesystem follows the variable
    return options


def filesystem(url: str, remote: RemoteConfig | None = None):
    """(fsspec filesystem, path) of ``url`` with the options :func:`storage_options` sets."""
    import fsspec

    remote = remote or RemoteConfig()
    protocol = url.split("://", 1)[0].lower()
    try:
        fs, path = fsspec.core.url_to_fs(url, **storage_options(protocol, remote))
    except (ImportError, ValueError) as e:  # unknown protocol, or its package is not installed
        raise _Permanent(_reason(e)) from None
    if protocol in S3_PROTOCOLS:
        fs.retries = 1  # s3fs's own retry loop: one attempt (the filesystem instance is fsspec's shared one)
    return fs, path


class _Deadline:
    """Runs a blocking call in a daemon thread and stops waiting for it after ``timeout_s`` (the thread is left
    to finish or fail on its own): a bound on waits for protocols whose timeout options are unknown here."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s

    def __call__(self, fn: Callable[[], Any]) -> Any:
        box: dict[str, Any] = {}
        done = threading.Event()

        def run() -> None:
            try:
                box["value"] = fn()
            except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
                box["error"] = e
            finally:
                done.set()

        threading.Thread(target=run, daemon=True, name="mm-ptft-remote").start()
        if not done.wait(self.timeout_s):
            raise TimeoutError(f"no answer within {self.timeout_s:g} s")
        if "error" in box:
            raise box["error"]
        return box["value"]


class _FsspecBody:
    def __init__(self, file, deadline: _Deadline | None):
        self._file, self._deadline = file, deadline

    def read(self, n: int) -> bytes:
        return self._deadline(lambda: self._file.read(n)) if self._deadline else self._file.read(n)

    def close(self) -> None:
        self._file.close()


def fsspec_opener(url: str, remote: RemoteConfig) -> Opener:
    """Open an fsspec URL at a byte offset (a seek). S3 waits are bounded by botocore's timeouts, other
    protocols' by a deadline on every call."""
    protocol = url.split("://", 1)[0].lower()
    deadline = None if protocol in S3_PROTOCOLS else _Deadline(remote.timeout_s)

    def open_file(offset: int) -> Opened:
        fs, path = filesystem(url, remote)
        try:
            file = fs.open(path, "rb")
        except (FileNotFoundError, IsADirectoryError) as e:
            raise _Permanent(_reason(e), missing=isinstance(e, FileNotFoundError)) from None
        except PermissionError as e:
            raise _Permanent(_reason(e)) from None
        try:
            if offset:
                file.seek(offset)
            details = getattr(file, "details", None) or {}
            tag = details.get("ETag") or details.get("etag")
            size = getattr(file, "size", None)
        except BaseException:
            file.close()
            raise
        return Opened(_FsspecBody(file, deadline), size, str(tag) if tag is not None else None)

    if deadline is None:
        return open_file
    return lambda offset: deadline(lambda: open_file(offset))


# ---------------------------------------------------------------------------------------------------------------------
# pipe:
# ---------------------------------------------------------------------------------------------------------------------


class _PipeReader:
    """stdout of a shell command, read with a timeout on every wait; stderr kept for the error message. The
    command runs in its own process group, so that stopping it stops what it started (``sh -c 'a | b'``)."""

    def __init__(self, command: str, timeout_s: float):
        self.timeout_s = timeout_s
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed with the reader
        self._proc = subprocess.Popen(  # noqa: S602 - pipe: is a shell command by definition (webdataset's)
            command, shell=True, stdout=subprocess.PIPE, stderr=self._stderr, start_new_session=True
        )

    def read(self, n: int) -> bytes:
        fd = self._proc.stdout.fileno()
        ready, _, _ = select.select([fd], [], [], self.timeout_s)
        if not ready:
            raise _Permanent(f"the command wrote nothing for {self.timeout_s:g} s")
        data = os.read(fd, n)
        if not data:
            try:
                status = self._proc.wait(timeout=self.timeout_s)
            except subprocess.TimeoutExpired:
                raise _Permanent(f"the command closed its output and ran on for {self.timeout_s:g} s") from None
            if status != 0:
                self._stderr.seek(0)
                said = self._stderr.read()[-300:].decode("utf-8", errors="replace").strip().replace("\n", " | ")
                raise _Permanent(f"the command exited with status {status}" + (f": {said}" if said else ""))
        return data

    def close(self) -> None:
        if self._proc.poll() is None:  # stopped early (or stalled): the command is not waited for
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc.wait()
        self._proc.stdout.close()
        self._stderr.close()


# ---------------------------------------------------------------------------------------------------------------------
# The one entry point
# ---------------------------------------------------------------------------------------------------------------------


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def open_shard(url: str, remote: RemoteConfig | None = None) -> BinaryIO:
    """Open a shard for reading as a buffered binary stream.

    Args:
        url: a local path, ``file://`` path, ``pipe:CMD``, ``http(s)://`` URL or any fsspec URL (``s3://…``).
        remote: timeouts and retries for remote shards (None → :class:`RemoteConfig` defaults).

    Raises:
        ShardReadError: the shard could not be opened (a remote one after its retries); later reads raise it when
            the shard fails part-way, ``delivered`` saying how far it got.
        OSError: a local file that cannot be opened.
    """
    remote = remote or RemoteConfig()
    if url.startswith("file://"):
        url = url[len("file://") :]
    if is_local(url):
        return open(url, "rb")
    if url.startswith("pipe:"):
        command = url[len("pipe:") :]
        raw = ResumingStream(url, lambda _: Opened(_PipeReader(command, remote.timeout_s)), remote, retries=0)
    elif url.split("://", 1)[0].lower() in ("http", "https"):
        raw = ResumingStream(url, http_opener(url, remote.timeout_s), remote)
    else:
        raw = ResumingStream(url, fsspec_opener(url, remote), remote)
    return io.BufferedReader(raw, buffer_size=BUFFER_BYTES)


def read_bytes(url: str, remote: RemoteConfig | None = None) -> bytes | None:
    """The whole content of a small file (``dataset.json``, ``sizes.json``) local or remote; None if it does not
    exist.

    Raises:
        ShardReadError: it exists (or may) but could not be read after the retries.
    """
    try:
        with open_shard(url, remote) as stream:
            return stream.read()
    except ShardReadError as e:
        if e.missing:
            return None
        raise
    except FileNotFoundError:
        return None
