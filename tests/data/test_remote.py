"""Remote shards (mm_ptft/data/remote.py, read_tar, resolve_shards) against real servers on 127.0.0.1 that these
tests start and stop: a ThreadingHTTPServer whose handler serves a directory with ``Range`` and injects faults per
path (a reset or a clean close at a byte offset, 500s, 404, an answer that never comes), and moto's S3 server.

The reference is the same shards read from the local disk: remote samples must equal them key for key and byte for
byte, a transient fault must change nothing, a permanent one must skip the shard, count it under its reason and
warn with its URL, within a time bound set by small ``RemoteConfig`` timeouts; a tiny run must train to the very
weights of the local run, and a run with a shard that always answers 500 must end normally.
"""

from __future__ import annotations

import re
import shutil
import socket
import struct
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch
from helpers import PRE_TINY, recorded_keys, records, summary_of

from mm_ptft import checkpoint as ckpt
from mm_ptft.cli import main
from mm_ptft.config import RemoteConfig, load_config
from mm_ptft.data import BadSampleLog, DataError, resolve_shards
from mm_ptft.data.remote import ShardReadError, open_shard, read_bytes
from mm_ptft.data.stream import StreamSpec, group_shards, read_tar

# faults that answer (500, 404, a reset) cost no waiting but the back-off: the timeout is only an upper bound there;
# faults that never answer cost a timeout per attempt: STALL keeps that short
FAST = RemoteConfig(timeout_s=2.0, retries=3, backoff_s=0.01)
STALL = RemoteConfig(timeout_s=0.5, retries=3, backoff_s=0.01)
SLACK_S = 3.0  # on top of the waits a fault costs: start-up, back-off and a busy 2-core machine
STALL_S = 20.0  # how long a stalled answer waits (released at teardown): far beyond any timeout here
SHARD = "fmnist-tiny/train/shard-000000.tar"
CUT = 100_000  # a byte offset about 30 % into a 338 kB shard


# ---------------------------------------------------------------------------------------------------------------------
# An HTTP server with faults
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Fault:
    kind: str  # "404" | "500" | "reset" (RST at byte `at`) | "close" (clean close at `at`) | "stall" | "stall_body"
    times: int | None = None  # requests it affects; None → every one
    at: int = 0  # absolute byte offset of the file where reset / close / stall_body strike


class FaultServer:
    """Serves ``root`` on 127.0.0.1 with ``Range``; ``faults[path]`` and ``no_range`` change how a path answers;
    ``requests[path]`` records each request's Range header (None without one)."""

    def __init__(self, root: Path):
        self.root = root
        self.faults: dict[str, Fault] = {}
        self.no_range: set[str] = set()  # paths answered 200 in full whatever Range asks
        self.requests: defaultdict[str, list[str | None]] = defaultdict(list)
        self.release = threading.Event()
        self._lock = threading.Lock()
        owner = self

        class Handler(_FaultHandler):
            server_owner = owner

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{path}"

    def take(self, path: str, range_header: str | None) -> Fault | None:
        with self._lock:
            self.requests[path].append(range_header)
            fault = self.faults.get(path)
            if fault is None or fault.times == 0:
                return None
            if fault.times is not None:
                fault.times -= 1
            return fault

    def reset(self) -> None:
        self.faults.clear()
        self.no_range.clear()
        self.requests.clear()
        self.release.set()  # wake stalled handlers of the last test
        self.release = threading.Event()

    def stop(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


class _FaultHandler(BaseHTTPRequestHandler):
    server_owner: FaultServer

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        owner = self.server_owner
        path = urlsplit(self.path).path.lstrip("/")
        fault = owner.take(path, self.headers.get("Range"))
        file = owner.root / path
        if (fault and fault.kind == "404") or not file.is_file():
            return self.send_error(404)
        if fault and fault.kind == "500":
            return self.send_error(500)
        if fault and fault.kind == "stall":
            owner.release.wait(STALL_S)  # never answers within any client timeout
            return
        data = file.read_bytes()
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and path not in owner.no_range:
            start = int(match.group(1))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("ETag", f'"{len(data)}"')
        self.end_headers()
        if not fault or fault.kind not in ("reset", "close", "stall_body"):
            self.wfile.write(data[start:])
            return
        self.wfile.write(data[start : max(start, fault.at)])
        if fault.kind == "stall_body":
            owner.release.wait(STALL_S)
        elif fault.kind == "reset":  # SO_LINGER 0: close() sends RST, as a dropped connection does
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        self.close_connection = True


@pytest.fixture(scope="module")
def www(tmp_path_factory) -> Path:
    """The directory both servers serve: a tiny Fashion-MNIST dataset dir (400 train / 400 test real samples in
    shards of 100, written in this process: faster than the session's data_tools subprocess), and room for more."""
    from data_tools.fashion_mnist import DEFAULT_SRC, write_fashion_mnist

    if not DEFAULT_SRC.is_dir():
        pytest.skip("Debian package dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
    root = tmp_path_factory.mktemp("www")
    write_fashion_mnist(root / "fmnist-tiny", limit=400, shard_size=100)
    return root


@pytest.fixture(scope="module")
def http_server(www):
    server = FaultServer(www)
    yield server
    server.stop()


@pytest.fixture
def http(http_server):
    http_server.reset()
    yield http_server
    http_server.reset()


# ---------------------------------------------------------------------------------------------------------------------
# An S3 server (moto)
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class S3:
    endpoint: str
    client: object
    bucket: str = "shards"

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def upload(self, root: Path, prefix: str) -> None:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                self.client.upload_file(str(path), self.bucket, f"{prefix}/{path.relative_to(root)}")


@pytest.fixture(scope="module")
def s3(www):
    """moto's S3 server on 127.0.0.1 holding the dataset dir; AWS_ENDPOINT_URL points s3:// at it."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as env:
        for key, value in {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            env.setenv(key, value)
        env.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        env.delenv("AWS_PROFILE", raising=False)
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket="shards")
        store = S3(endpoint, client)
        store.upload(www / "fmnist-tiny", "fmnist-tiny")
        yield store
    server.stop()


# ---------------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------------


def _samples(url: str, remote: RemoteConfig | None = None) -> tuple[list[dict], BadSampleLog]:
    log = BadSampleLog(max_warnings=100)
    return [{k: v for k, v in s.items() if k != "__url__"} for s in read_tar(url, log, remote)], log


@pytest.fixture(scope="module")
def local(www) -> list[dict]:
    samples, log = _samples(str(www / SHARD))
    assert len(samples) == 100 and not log.counts
    return samples


def _by_name(urls: list[str]) -> list[str]:
    return [u.rsplit("/", 1)[1] for u in urls]


def test_http_and_s3_dataset_dirs_and_patterns_read_like_the_local_dir(www, http, s3):
    here = resolve_shards(str(www / "fmnist-tiny"))
    for base in (http.url("fmnist-tiny"), s3.url("fmnist-tiny")):
        there = resolve_shards(base, remote=FAST)
        assert there.urls == [f"{base}/train/{name}" for name in _by_name(here.urls)]
        assert (there.num_samples, there.meta) == (here.num_samples, here.meta)  # classnames, templates, counts
        assert _by_name(there.sizes) == _by_name(here.sizes) and list(there.sizes.values()) == list(here.sizes.values())
        for mine, theirs in zip(here.urls, there.urls, strict=True):
            remote_samples, log = _samples(theirs, FAST)
            assert remote_samples == _samples(mine)[0] and not log.counts, theirs
        test = resolve_shards(base, "test", FAST)
        assert test.num_samples == 400 and test.urls[0] == f"{base}/test/shard-000000.tar"
        pattern = resolve_shards(f"{base}/train/shard-{{000000..000003}}.tar", remote=FAST)
        assert pattern.urls == there.urls and pattern.num_samples == 400  # sizes.json next to the shards
    # an S3 prefix without dataset.json is listed (img2dataset output in a bucket), an HTTP one cannot be
    assert resolve_shards(s3.url("fmnist-tiny/train"), remote=FAST).urls == there.urls


def test_pipe_and_fsspec_shards_read_like_local_and_are_bounded(www, local):
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    shard = www / SHARD
    assert _samples(f"pipe:cat {shard}")[0] == local
    memory = "memory://remote-test/shard-000000.tar"
    with fsspec.open(memory, "wb") as f:
        f.write(shard.read_bytes())
    assert _samples(memory, FAST)[0] == local

    t0 = time.monotonic()
    with pytest.warns(UserWarning, match=r"in pipe:cat /nonexistent/shard\.tar: .*exited with status 1: cat: "):
        samples, log = _samples("pipe:cat /nonexistent/shard.tar", FAST)
    assert not samples and log.counts == {"shard_open_error": 1}
    with pytest.warns(UserWarning, match=rf"tar_error\) in pipe:head .*ends at byte {CUT}, before the end-of-archive"):
        samples, log = _samples(f"pipe:head -c {CUT} {shard}", FAST)  # a command that delivers part of the shard
    assert 0 < len(samples) < 100 and samples == local[: len(samples)] and log.counts == {"tar_error": 1}
    with pytest.warns(UserWarning, match=r"shard_open_error\) in pipe:sleep 30: .*wrote nothing for 0.5 s"):
        samples, log = _samples("pipe:sleep 30", STALL)  # a command that hangs: killed after timeout_s
    assert not samples and log.counts == {"shard_open_error": 1}

    class Hanging(MemoryFileSystem):  # a protocol whose waits have no timeout of their own
        protocol = "hangs"
        release = threading.Event()

        def _open(self, path, mode="rb", **kwargs):
            self.release.wait(STALL_S)
            return super()._open(path, mode, **kwargs)

    fsspec.register_implementation("hangs", Hanging, clobber=True)
    try:
        with pytest.warns(UserWarning, match=r"in hangs://x\.tar: gave up after 2 attempts: TimeoutError"):
            samples, log = _samples("hangs://x.tar", RemoteConfig(timeout_s=0.5, retries=1, backoff_s=0.01))
        assert not samples and log.counts == {"shard_open_error": 1}
    finally:
        Hanging.release.set()
    assert time.monotonic() - t0 < 3 * 0.5 + SLACK_S  # the pipe's timeout and two deadlines


TRANSIENT = {
    "reset mid-shard": (Fault("reset", 1, CUT), set(), 2),
    "clean close mid-shard": (Fault("close", 1, CUT), set(), 2),
    "500 twice": (Fault("500", 2), set(), 3),
    "no answer once": (Fault("stall", 1), set(), 2),
    "stops mid-shard once": (Fault("stall_body", 1, CUT), set(), 2),
    "close, server ignores Range": (Fault("close", 1, CUT), {SHARD}, 2),
}


@pytest.mark.parametrize("case", list(TRANSIENT))
def test_a_transient_http_fault_is_retried_and_changes_nothing(http, local, case):
    fault, no_range, requests = TRANSIENT[case]
    http.faults[SHARD], http.no_range = fault, no_range
    remote = STALL if fault.kind.startswith("stall") else FAST
    t0 = time.monotonic()
    samples, log = _samples(http.url(SHARD), remote)
    assert samples == local and not log.counts
    sent = http.requests[SHARD]
    assert len(sent) == requests and sent[0] is None
    if fault.kind in ("close", "stall_body"):  # every byte before the cut arrived: the retry resumes right there
        assert sent[1] == f"bytes={CUT}-"
    elif fault.kind == "reset":  # the bytes in flight at a reset may be lost: it resumes at or before the cut
        assert sent[1] is None or int(sent[1][6:-1]) <= CUT
    assert time.monotonic() - t0 < (remote.timeout_s if remote is STALL else 0) + SLACK_S


PERMANENT = {
    "404": (Fault("404"), "shard_open_error", 1, "HTTP 404 .*"),
    "500 always": (Fault("500"), "shard_open_error", 4, "HTTP 500"),
    "never answers": (Fault("stall"), "shard_open_error", 4, "timed out"),
    "reset at the same byte always": (Fault("reset", None, CUT), "tar_error", 4, "Reset|ended at byte"),
    "closes at the same byte always": (Fault("close", None, CUT), "tar_error", 4, f"ended at byte {CUT} of"),
    "stops at the same byte always": (Fault("stall_body", None, CUT), "tar_error", 4, "timed out"),
}


@pytest.mark.parametrize("case", list(PERMANENT))
def test_a_permanent_http_fault_skips_the_shard_counts_it_and_names_it(http, local, case):
    fault, reason, requests, said = PERMANENT[case]
    http.faults[SHARD] = fault
    url = http.url(SHARD)
    stalls = fault.kind.startswith("stall")
    t0 = time.monotonic()
    with pytest.warns(UserWarning, match=rf"skipped \({reason}\) in {re.escape(url)}: gave up after {requests} att"):
        samples, log = _samples(url, STALL if stalls else FAST)
    elapsed = time.monotonic() - t0
    assert log.counts == {reason: 1} and len(http.requests[SHARD]) == requests
    assert samples == local[: len(samples)]  # what was read before the damage is kept
    assert (0 < len(samples) < 100) if reason == "tar_error" else not samples
    assert elapsed < (requests * STALL.timeout_s if stalls else 0) + SLACK_S  # a timeout per attempt, no more
    if not stalls:  # the error itself names the URL, the attempts and the last reason
        with pytest.raises(ShardReadError, match=said) as error, open_shard(url, FAST) as stream:
            stream.read()
        assert str(error.value).startswith(f"{url}: gave up after {requests} attempt")


def test_s3_missing_keys_and_an_endpoint_that_never_answers_are_bounded(s3, monkeypatch):
    with pytest.warns(UserWarning, match=r"in s3://shards/fmnist-tiny/train/nope\.tar: gave up after 1 attempt: File"):
        samples, log = _samples(s3.url("fmnist-tiny/train/nope.tar"), FAST)
    assert not samples and log.counts == {"shard_open_error": 1}  # not found: not retried
    with socket.socket() as hole:  # accepts connections (the kernel's backlog) and never answers
        hole.bind(("127.0.0.1", 0))
        hole.listen(16)
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{hole.getsockname()[1]}")
        url = s3.url(SHARD)
        t0 = time.monotonic()
        with pytest.warns(UserWarning, match=rf"in {re.escape(url)}: gave up after 2 attempts: .*[Tt]imeout"):
            samples, log = _samples(url, RemoteConfig(timeout_s=0.4, retries=1, backoff_s=0.01))
        assert time.monotonic() - t0 < 2 * 0.4 + SLACK_S  # a read timeout per attempt
    assert not samples and log.counts == {"shard_open_error": 1}


def test_remote_metadata_errors_are_one_line_and_img2dataset_stats_give_sizes(www, http, s3):
    missing = http.url("no-such-dataset")
    with pytest.raises(DataError, match=re.escape(f"data: {missing}/dataset.json not found")) as error:
        resolve_shards(missing, remote=FAST)
    assert "\n" not in str(error.value)
    http.faults["fmnist-tiny/dataset.json"] = Fault("500")
    with pytest.raises(DataError, match=r"cannot read http://.*/dataset\.json: gave up after 4 attempts: HTTP 500"):
        resolve_shards(http.url("fmnist-tiny"), remote=FAST)
    del http.faults["fmnist-tiny/dataset.json"]
    (www / "broken").mkdir()
    (www / "broken" / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match=r"broken/dataset\.json: not valid JSON"):
        resolve_shards(http.url("broken"), remote=FAST)
    with pytest.raises(DataError, match="split 'val' not in"):
        resolve_shards(http.url("fmnist-tiny"), "val", FAST)
    assert read_bytes(http.url("fmnist-tiny/nothing.json"), FAST) is None
    with pytest.raises(DataError, match=r"cannot read nosuch://b/x\.tar: Protocol not known: nosuch"):
        resolve_shards("nosuch://b/x.tar")

    # img2dataset's layout: NNNNN.tar with NNNNN_stats.json ("successes"), no sizes.json
    i2d = www / "i2d"
    i2d.mkdir()
    for i in range(2):
        shutil.copy(www / f"fmnist-tiny/train/shard-00000{i}.tar", i2d / f"0000{i}.tar")
        (i2d / f"0000{i}_stats.json").write_text(f'{{"count": 110, "successes": {100 - i}, "failed_to_download": 9}}')
    assert resolve_shards(str(i2d)).num_samples == 199  # a local dir of shards
    assert resolve_shards(str(i2d / "{00000..00001}.tar")).num_samples == 199
    assert resolve_shards(http.url("i2d/{00000..00001}.tar"), remote=FAST).num_samples == 199
    s3.upload(i2d, "i2d")
    listed = resolve_shards(s3.url("i2d"), remote=FAST)
    assert _by_name(listed.urls) == ["00000.tar", "00001.tar"] and listed.num_samples == 199
    # a remote pattern without sizes.json or stats: the shards are read, their sizes are unknown
    (i2d / "00000_stats.json").unlink()
    shards = resolve_shards(http.url("i2d/{00000..00001}.tar"), remote=FAST)
    assert len(shards.urls) == 2 and shards.num_samples is None
    (i2d / "00000_stats.json").write_text('{"count": 3}')
    with pytest.raises(DataError, match=r"00000_stats\.json has no integer 'successes'"):
        resolve_shards(str(i2d))


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------


def _train(data: str, out: Path, name: str, *extra: str) -> Path:
    overrides = [
        f"data.train={data}",
        "eval.data=null",
        f"train.output_dir={out}",
        f"train.name={name}",
        "train.progress=false",
        "train.tensorboard=false",
        "train.report=false",
        "train.steps=4",
        "train.log_every=2",
        "data.remote.timeout_s=10",
        "data.remote.backoff_s=0.01",
        *extra,
    ]
    assert main(["train", "-c", str(PRE_TINY), *overrides]) == 0
    return out / name


def test_http_and_s3_shards_train_to_the_weights_of_local_shards(www, http, s3, tmp_path):
    runs = {
        "local": _train(str(www / "fmnist-tiny"), tmp_path, "local"),
        "http": _train(http.url("fmnist-tiny"), tmp_path, "http"),
        "s3": _train(s3.url("fmnist-tiny"), tmp_path, "s3"),
    }
    weights = {name: ckpt.load_weights(run / "model.safetensors") for name, run in runs.items()}
    for name in ("http", "s3"):
        assert weights[name].keys() == weights["local"].keys()
        for key, value in weights["local"].items():
            assert torch.equal(weights[name][key], value), (name, key)
        assert [r["loss"] for r in records(runs[name], "train")] == [r["loss"] for r in records(runs["local"], "train")]
        assert summary_of(runs[name])["bad_samples"] == 0


def test_a_run_with_a_shard_that_always_answers_500_ends_normally_and_counts_it(http, tmp_path):
    base = http.url("fmnist-tiny")
    cfg = load_config(PRE_TINY, [f"data.train={base}"])
    urls = resolve_shards(base, remote=FAST).urls
    spec = StreamSpec(tuple(urls), cfg.train.seed, n_workers=1, group_size=cfg.data.shuffle_group)
    bad = group_shards(spec, 0, 0)[0]  # a shard the first steps read
    http.faults[urlsplit(bad).path.lstrip("/")] = Fault("500")
    with pytest.warns(UserWarning, match=rf"skipped \(shard_open_error\) in {re.escape(bad)}: .*HTTP 500"):
        run = _train(base, tmp_path, "faulty", "data.workers=0", "data.remote.retries=2")
    assert summary_of(run)["bad_samples"] == 1
    assert records(run, "train")[-1]["bad_samples"] == 1  # cumulative: the shard was read (and skipped) once


def test_a_remote_mixture_resumes_exactly_through_transient_faults(www, http, s3, tmp_path):
    """A mixture of an HTTP source and an S3 source, stopped after 2 steps and resumed, reads the keys and reaches the
    weights of the uninterrupted run, although every shard's first request of the resumed run is reset mid-body."""
    mixture = (
        f"data.train=[{{path: {http.url('fmnist-tiny')}, weight: 0.6, name: web}}, "
        f"{{path: {s3.url('fmnist-tiny')}, split: test, weight: 0.4, name: bucket}}]"
    )
    common = [mixture, "train.record_keys=true", "data.workers=0"]
    full = _train("unused", tmp_path, "full", *common)
    _train("unused", tmp_path, "cut", *common, "train.save_every=2", "train.stop_after=2")
    for path in resolve_shards(str(www / "fmnist-tiny")).urls:  # the HTTP source's shards, served from `www`
        http.faults[Path(path).relative_to(www).as_posix()] = Fault("reset", times=1, at=3000)
    http.requests.clear()
    cut = _train("unused", tmp_path, "cut", *common, "train.resume=latest", "data.remote.retries=2")
    retried = [r for reqs in http.requests.values() for r in reqs if r == "bytes=3000-"]
    assert retried, "the resumed run met no fault"  # each reset shard was read again from its byte 3000
    assert recorded_keys(cut, 0) == recorded_keys(full, 0)
    want, got = ckpt.load_weights(full / "model.safetensors"), ckpt.load_weights(cut / "model.safetensors")
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert summary_of(cut)["bad_samples"] == 0 and summary_of(cut)["data/bucket/samples"] > 0
