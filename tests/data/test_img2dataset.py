"""Shards written by the real ``img2dataset`` package train directly (docs/data.md "From a URL list to a run").

The URL list points at real clip-art PNGs (Debian ``openclipart-png``) that a ThreadingHTTPServer on 127.0.0.1 serves,
plus URLs that answer 404 and one that is not an image. img2dataset runs once per module, through its Python API with
the multiprocessing distributor (it spawns a download process and a logger process), and its output is held against
the URL list: every URL fetched once from our server, the failures absent from the tars and counted in
``NNNNN_stats.json`` / ``NNNNN.parquet``, and every success read, decoded and trained on by mm-ptft.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import tarfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from helpers import PRE_TINY, records, summary_of, tar_samples

from mm_ptft import checkpoint as ckpt
from mm_ptft.config import ImageTransformConfig, load_config
from mm_ptft.data import BadSampleLog, SampleDecoder, create_transform, resolve_shards
from mm_ptft.data.stream import read_tar

OPENCLIPART = Path("/usr/share/openclipart/png")
N_IMAGES = 40
PER_SHARD = 16  # 44 URLs → shards of 16, 16 and 12
MISSING_AT = (5, 20, 33)  # list positions of URLs that answer 404 (one or two in each shard)
NOT_IMAGE_AT = 27  # a text file: downloaded, then refused by img2dataset's resizer


@dataclass
class Img2datasetRun:
    out: Path
    rows: list[dict]  # the URL list: url, caption, label, expect ("success" | "404" | "not_image")
    requests: Counter  # path → GET requests our server answered
    seconds: float


class _Recording(SimpleHTTPRequestHandler):
    """Serves a directory quietly and counts the requests for each path."""

    requests: Counter

    def do_GET(self):  # noqa: N802 - the http.server hook name
        self.requests[self.path] += 1
        super().do_GET()

    def log_message(self, format, *args):  # noqa: A002 - http.server's signature
        pass


@pytest.fixture(scope="module")
def www(tmp_path_factory):
    """``(root, base_url, requests)``: a temp dir served on 127.0.0.1 for the module, stopped at its end."""
    root = tmp_path_factory.mktemp("i2d-www")
    requests: Counter = Counter()
    handler = type("Handler", (_Recording,), {"requests": requests})
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}", requests
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def _clipart() -> list[Path]:
    """N_IMAGES small PNGs spread over the top categories (subfolders repeat the same files, so they are left out)."""
    if not OPENCLIPART.is_dir():
        pytest.skip("Debian package openclipart-png is not installed (apt-get install openclipart-png)")
    small = [p for p in sorted(OPENCLIPART.glob("*/*.png")) if p.stat().st_size < 30_000]
    if len(small) < N_IMAGES:
        pytest.skip(f"only {len(small)} small PNGs under {OPENCLIPART}")
    return small[:: len(small) // N_IMAGES][:N_IMAGES]


def _url_list(root: Path, base: str) -> list[dict]:
    images = iter(_clipart())
    categories = sorted(p.name for p in OPENCLIPART.iterdir() if p.is_dir())
    rows = []
    for i in range(N_IMAGES + len(MISSING_AT) + 1):
        if i in MISSING_AT:
            rows.append({"url": f"{base}/missing-{i}.png", "caption": "gone", "label": 0, "expect": "404"})
        elif i == NOT_IMAGE_AT:
            (root / "notes.txt").write_text("not an image\n")
            rows.append({"url": f"{base}/notes.txt", "caption": "a note", "label": 0, "expect": "not_image"})
        else:
            src = next(images)
            shutil.copy(src, root / f"{i:03d}.png")
            title = re.sub(r"_\d+$", "", src.stem).replace("_", " ").strip()  # file names: title_author_NN
            rows.append(
                {
                    "url": f"{base}/{i:03d}.png",
                    "caption": f"{title}, clip art of {src.parent.name}",
                    "label": categories.index(src.parent.name),
                    "expect": "success",
                }
            )
    return rows


@pytest.fixture(scope="module")
def i2d(www, tmp_path_factory) -> Img2datasetRun:
    """img2dataset's webdataset output for the URL list, written once per module."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root, base, requests = www
    rows = _url_list(root, base)
    work = tmp_path_factory.mktemp("i2d")
    columns = {name: [r[name] for r in rows] for name in ("url", "caption", "label")}
    pq.write_table(pa.table(columns), work / "urls.parquet")
    out = work / "shards"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations (imported by img2dataset) asks PyPI otherwise
        for proxy in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
            mp.delenv(proxy, raising=False)  # urllib must reach 127.0.0.1 itself
        from img2dataset import download

        sigint = signal.getsignal(signal.SIGINT)  # download() installs its own SIGINT handler in this process
        t0 = time.perf_counter()
        try:
            download(
                url_list=str(work / "urls.parquet"),
                input_format="parquet",
                url_col="url",
                caption_col="caption",
                save_additional_columns=["label"],
                output_folder=str(out),
                output_format="webdataset",
                encode_format="jpg",
                image_size=64,
                resize_mode="border",
                processes_count=1,
                thread_count=4,
                number_sample_per_shard=PER_SHARD,
                distributor="multiprocessing",
                timeout=5,
                retries=0,
                enable_wandb=False,
            )
        finally:
            signal.signal(signal.SIGINT, sigint)
        seconds = time.perf_counter() - t0
    print(f"img2dataset: {seconds:.1f} s for {len(rows)} URLs")
    return Img2datasetRun(out, rows, requests, seconds)


def _stats(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("*_stats.json"))]


def _successes(run: Img2datasetRun) -> list[dict]:
    return [r for r in run.rows if r["expect"] == "success"]


# ---------------------------------------------------------------------------------------------------------------------
# What img2dataset writes
# ---------------------------------------------------------------------------------------------------------------------


def test_img2dataset_writes_shards_without_the_failed_downloads(i2d):
    import pyarrow.parquet as pq

    # every URL of the list was fetched from our server, once: nothing was fetched from anywhere else
    assert all(r["url"].startswith("http://127.0.0.1:") for r in i2d.rows)
    assert sorted(i2d.requests.elements()) == sorted(re.sub(r"^http://[^/]+", "", r["url"]) for r in i2d.rows)

    n_shards = math.ceil(len(i2d.rows) / PER_SHARD)
    names = [f"{s:05d}{suffix}" for s in range(n_shards) for suffix in (".parquet", ".tar", "_stats.json")]
    assert sorted(p.name for p in i2d.out.iterdir()) == names  # its _tmp dir is gone

    stats = _stats(i2d.out)
    assert [s["count"] for s in stats] == [16, 16, 12]
    assert sum(s["successes"] for s in stats) == N_IMAGES
    assert sum(s["failed_to_download"] for s in stats) == len(MISSING_AT)
    assert sum(s["failed_to_resize"] for s in stats) == 1  # the text file

    by_url = {r["url"]: r for r in i2d.rows}
    for shard, shard_stats in zip(sorted(i2d.out.glob("*.tar")), stats, strict=True):
        samples = tar_samples(shard)
        assert len(samples) == shard_stats["successes"]
        table = pq.read_table(shard.with_suffix(".parquet")).to_pylist()  # one row per URL of the shard, failed or not
        assert len(table) == shard_stats["count"]
        assert {row["key"] for row in table if row["status"] == "success"} == set(samples)
        for row in table:
            expected = {"success": "success", "404": "failed_to_download", "not_image": "failed_to_resize"}
            assert row["status"] == expected[by_url[row["url"]]["expect"]], row
        for key, fields in samples.items():
            assert set(fields) == {"jpg", "txt", "json"}, key
            meta = json.loads(fields["json"])
            row = by_url[meta["url"]]
            assert row["expect"] == "success" and meta["key"] == key and meta["status"] == "success"
            assert fields["txt"].decode() == row["caption"] == meta["caption"]
            assert meta["label"] == row["label"]  # save_additional_columns land in the json
            assert (meta["width"], meta["height"]) == (64, 64) and fields["jpg"][:3] == b"\xff\xd8\xff"


# ---------------------------------------------------------------------------------------------------------------------
# What mm-ptft reads from it
# ---------------------------------------------------------------------------------------------------------------------


def test_the_reader_counts_and_decodes_every_success(i2d):
    shards = resolve_shards(str(i2d.out))  # a directory of *.tar: no dataset.json, no sizes.json
    assert shards.urls == [str(p) for p in sorted(i2d.out.glob("*.tar"))]
    # the sample counts come from img2dataset's NNNNN_stats.json ("successes")
    assert [shards.sizes[u] for u in shards.urls] == [s["successes"] for s in _stats(i2d.out)]
    assert shards.num_samples == N_IMAGES

    log = BadSampleLog(max_warnings=0)
    raw = [sample for url in shards.urls for sample in read_tar(url, log)]
    assert len(raw) == N_IMAGES and not log.counts
    transform = create_transform(ImageTransformConfig(), 28, 3, [0.5] * 3, [0.5] * 3, False)
    decode = SampleDecoder(transform, ["jpg", "jpeg", "png", "webp"])
    decoded = [decode(r, log) for r in raw]
    assert not log.counts  # img2dataset's json (key, status, url, caption, width, exif, sha256 …) is no bad sample
    wanted = {r["caption"]: r for r in _successes(i2d)}
    assert sorted(d["caption"] for d in decoded) == sorted(wanted)
    for d in decoded:
        assert d["label"] == wanted[d["caption"]]["label"]  # an integer "label" column is the sample's label
        assert d["image"].shape == (3, 28, 28) and torch.isfinite(d["image"]).all()


def test_the_tiny_recipe_trains_on_img2dataset_output(i2d, tmp_path):
    from mm_ptft.train.trainer import Trainer

    overrides = [
        f"data.train={i2d.out}",
        "train.steps=null",  # the run length comes from the stats' sample counts
        "train.epochs=2",
        f"eval.data={i2d.out}",
        "eval.evaluators=[retrieval]",  # the img2dataset dir has no class names for zero-shot
        f"train.output_dir={tmp_path}",
        "train.name=i2d",
        "train.progress=false",
        "train.tensorboard=false",
        "train.report=false",
    ]
    trainer = Trainer(load_config(PRE_TINY, overrides))
    assert trainer.total_steps == 2 * N_IMAGES // 16
    before = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()

    run = tmp_path / "i2d"
    losses = [r["loss"] for r in records(run, "train")]
    assert losses and all(math.isfinite(x) for x in losses)
    summary = summary_of(run)
    assert summary["step"] == trainer.total_steps and summary["bad_samples"] == 0
    assert 0.0 <= summary["retrieval/image_retrieval_recall@1"] <= 1.0
    after = ckpt.load_weights(run / "model.safetensors")
    assert after.keys() == before.keys()
    assert all(torch.isfinite(v).all() for v in after.values())
    changed = [k for k in before if before[k].is_floating_point() and not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2, f"only {len(changed)} of {len(before)} tensors changed"


# ---------------------------------------------------------------------------------------------------------------------
# What data_tools verify says about it
# ---------------------------------------------------------------------------------------------------------------------


def test_data_tools_verify_passes_img2dataset_shards_given_as_a_pattern(i2d):
    from data_tools import verify_dataset

    report = verify_dataset(f"{i2d.out}/*.tar")
    assert report.ok, report.bad
    assert (report.num_shards, report.num_samples) == (3, N_IMAGES)


def test_data_tools_verify_passes_an_img2dataset_directory(i2d):
    from data_tools import verify_dataset

    report = verify_dataset(i2d.out)
    assert report.ok, report.bad
    assert report.num_samples == N_IMAGES
