"""Input pipeline at 224 px, per core: decode + random-resized crop + flip + to-tensor + normalise, on web-like JPEGs.

    python bench/decode_224.py [--images 300] [--reps 5] [--chunk 50] [--simd-python PY] [--turbojpeg-path DIR]
                               [--out bench/results/decode_224-cpu.json]

One process, ``torch.set_num_threads(1)``: samples/s is per core. The images are openclipart PNGs (Debian's
``openclipart-png``) composited on white, resized to a longer side drawn uniformly in 300-800 px and re-encoded as JPEG
quality 90 (Pillow's default 4:2:0 subsampling), written to a temp dir from a seed and read into memory, so every row
decodes the same bytes, as a shard reader hands them over. The rows take turns chunk by chunk (round-robin, the order
rotated each round) so that load from other processes falls on all of them alike; "× open_clip" is the median over
rounds of each row's rate over open_clip's in the same round. /proc/loadavg is recorded.

Rows: open_clip's training pipeline exactly as open_clip_train runs it (``Image.open(…).convert('RGB')`` then
``open_clip.image_transform(224, is_train=True)``: RandomResizedCrop scale 0.9-1.0, bicubic, no flip); mm-ptft as it
is at git HEAD and with ``fast_decode`` off (``create_transform`` + ``decode_image``: the same crop, hflip 0.5, full PIL
decode); the fast-path decoders through mm-ptft's planned crop (PIL ``draft``, simplejpeg, PyTurboJPEG, and
``torchvision.io.decode_jpeg``, which has no DCT scaling), each followed by the same uint8 antialiased resize (torch),
flip and normalise; and mm-ptft's default fast path end to end. ``--simd-python`` (a separate venv with pillow-simd in
place of Pillow and this venv's site-packages after its own) adds open_clip's and mm-ptft's full-decode rows under
pillow-simd, timed in a child process that takes its turn in the same rounds. ``--turbojpeg-path`` puts a PyTurboJPEG
1.x first on sys.path (2.x needs libjpeg-turbo ≥ 3; Debian 12 ships 2.1.5). Each fast row also reports the mean share
of pixels it decoded and its mean absolute difference from the full-decode row on the same crops.

    .venv/bin/python -m venv /tmp/simd && CC="cc -mavx2" /tmp/simd/bin/pip install pillow-simd   # ~3 min build
    echo "$PWD/.venv/lib/python3.11/site-packages" > /tmp/simd/lib/python3.11/site-packages/zz_main.pth
    pip install --no-deps --target /tmp/pyturbojpeg1 "PyTurboJPEG<2"    # and apt-get install libturbojpeg0
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CLIPART = Path("/usr/share/openclipart/png")
SIZE = 224
MEAN = [0.48145466, 0.4578275, 0.40821073]  # open_clip's OPENAI_DATASET_MEAN / STD, for every row
STD = [0.26862954, 0.26130258, 0.27577711]


# ------------------------------------------------------------------------------------------------------ corpus
def make_corpus(out: Path, n: int, seed: int, quality: int, lossless: int = 50) -> list[Path]:
    """``n`` openclipart PNGs on white, longer side uniform in 300-800 px, as JPEG ``quality`` files in ``out``; the
    first ``lossless`` also as PNGs of the same pixels (``lossless/``): JPEG's own error, beside the fast path's."""
    from PIL import Image

    files = sorted(CLIPART.rglob("*.png"))
    if not files:
        sys.exit(f"error: no PNGs under {CLIPART}; apt-get install openclipart-png")
    rng = random.Random(seed)
    paths = []
    for i, src in enumerate(rng.sample(files, n)):
        with Image.open(src) as im:
            rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        white.alpha_composite(rgba)
        longer = rng.randint(300, 800)
        scale = longer / max(white.size)
        size = (max(1, round(white.width * scale)), max(1, round(white.height * scale)))
        path = out / f"{i:05d}.jpg"
        image = white.convert("RGB").resize(size, Image.LANCZOS)
        image.save(path, "JPEG", quality=quality)
        if i < lossless:
            (out / "lossless").mkdir(exist_ok=True)
            image.save(out / "lossless" / f"{i:05d}.png")
        paths.append(path)
    return paths


def corpus_stats(datas: list[bytes]) -> dict:
    from PIL import Image

    sizes = [Image.open(io.BytesIO(d)).size for d in datas]
    longer, shorter = [max(s) for s in sizes], [min(s) for s in sizes]
    return {
        "images": len(datas),
        "longer_side_px": [min(longer), statistics.median(longer), max(longer)],
        "shorter_side_px": [min(shorter), statistics.median(shorter), max(shorter)],
        "mean_kb": statistics.mean(len(d) for d in datas) / 1024,
        "megapixels_mean": statistics.mean(w * h for w, h in sizes) / 1e6,
    }


# -------------------------------------------------------------------------------------------------------- rows
class Row:
    """One pipeline: ``run(data, generator)`` → (3, 224, 224) float tensor. ``seeded`` rows draw from the generator
    (mm-ptft); open_clip draws from the global RNG, seeded at the start of each repetition."""

    def __init__(self, name: str, run: Callable, decoder: str, note: str = "", decoder_obj=None):
        self.name, self.run, self.decoder, self.note, self.decoder_obj = name, run, decoder, note, decoder_obj


def _mm_cfg(fast: bool):
    from mm_ptft.config import ImageTransformConfig

    cfg = ImageTransformConfig(train_scale=[0.9, 1.0], hflip=0.5)
    cfg.fast_decode = fast  # read with getattr(…, True) until config.py declares it
    return cfg


def _head_transforms():
    """mm_ptft/data/transforms.py as committed at git HEAD (the pipeline "as it is today"), or None without git."""
    import importlib.util

    try:
        source = subprocess.run(
            ["git", "show", "HEAD:mm_ptft/data/transforms.py"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    folder = Path(tempfile.mkdtemp(prefix="decode224_head_"))
    try:
        path = folder / "head_transforms.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location("head_transforms", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return module


def open_clip_row(name: str = "open_clip (PIL + torchvision)") -> Row:
    import open_clip
    from PIL import Image

    transform = open_clip.image_transform(SIZE, is_train=True, mean=MEAN, std=STD)

    def run(data: bytes, generator):
        return transform(Image.open(io.BytesIO(data)).convert("RGB"))

    return Row(name, run, "PIL full", "scale 0.9-1.0, bicubic, no flip")


def mm_full_row(name: str, transforms_module=None) -> Row:
    from mm_ptft.data.decode import BadSampleLog, decode_image
    from mm_ptft.data.transforms import create_transform

    create = transforms_module.create_transform if transforms_module else create_transform
    transform = create(_mm_cfg(False), SIZE, 3, MEAN, STD, True)
    log = BadSampleLog()

    def run(data: bytes, generator):
        return decode_image(data, lambda im: transform(im, generator), log, "bench", "k")

    return Row(name, run, "PIL full", "scale 0.9-1.0, bicubic, hflip 0.5")


def planned_row(name: str, decoder, note: str = "") -> Row:
    """A reduced-size decoder behind mm-ptft's planned crop (same draws as the full path), then the same tail."""
    from mm_ptft.data.decode import _decode_planned
    from mm_ptft.data.transforms import create_transform

    transform = create_transform(_mm_cfg(True), SIZE, 3, MEAN, STD, True)

    def run(data: bytes, generator):
        out = _decode_planned(data, transform.bind(generator), decoder)
        if out is None:
            raise RuntimeError(f"{decoder.name}: the planned path did not apply")
        return out

    return Row(name, run, decoder.name, note, decoder)


def mm_fast_row() -> Row:
    from mm_ptft.data.decode import BadSampleLog, decode_image, jpeg_decoder
    from mm_ptft.data.transforms import create_transform

    transform = create_transform(_mm_cfg(True), SIZE, 3, MEAN, STD, True)
    log = BadSampleLog()

    def run(data: bytes, generator):
        return decode_image(data, transform.bind(generator), log, "bench", "k")

    return Row("mm-ptft fast (decode_image)", run, jpeg_decoder().name, "the default path", jpeg_decoder())


def turbojpeg_decoder(path: str | None):
    """A :class:`JpegDecoder` on PyTurboJPEG (k/8 scaling like simplejpeg), or the reason it cannot load."""
    from mm_ptft.data.decode import JpegDecoder

    if path:
        sys.path.insert(0, path)
    try:
        import turbojpeg

        jpeg = turbojpeg.TurboJPEG()
    except Exception as e:  # noqa: BLE001 - a missing libturbojpeg, or PyTurboJPEG 2.x on libjpeg-turbo 2.x
        return None, f"{type(e).__name__}: {str(e).splitlines()[0]}"
    import torch

    def header(data: bytes):
        width, height, _, colorspace = jpeg.decode_header(data)[:4]
        return (width, height, colorspace) if colorspace in (turbojpeg.TJCS_YCbCr, turbojpeg.TJCS_RGB) else None

    def decode(data: bytes, colorspace, plan, width: int, height: int):
        k = next((k for k in range(1, 8) if plan.fits(k / 8)), 8)
        g = math.gcd(k, 8)
        array = jpeg.decode(data, pixel_format=turbojpeg.TJPF_RGB, scaling_factor=(k // g, 8 // g))
        return torch.from_numpy(array).permute(2, 0, 1), k / 8

    version = getattr(turbojpeg, "__version__", "?")
    return JpegDecoder(f"PyTurboJPEG {version}", header, decode), None


def build_rows(turbojpeg_path: str | None, simd: bool = False) -> tuple[list[Row], list[dict]]:
    """The rows this process runs; ``simd``: the two full-decode rows only (the pillow-simd child)."""
    from mm_ptft.data.decode import JPEG_DECODERS

    suffix = " [pillow-simd]" if simd else ""
    rows = [open_clip_row("open_clip (PIL + torchvision)" + suffix)]
    head = _head_transforms()
    if head is not None:
        rows.append(mm_full_row("mm-ptft today (git HEAD)" + suffix, head))
    rows.append(mm_full_row("mm-ptft fast_decode=false" + suffix))
    if simd:
        return rows, []
    skipped = []
    rows.append(planned_row("fast: PIL draft (1/2..1/8)", JPEG_DECODERS["pil"], "zero new dependency"))
    rows.append(planned_row("fast: simplejpeg (k/8)", JPEG_DECODERS["simplejpeg"]))
    decoder, error = turbojpeg_decoder(turbojpeg_path)
    if decoder is not None:
        rows.append(planned_row("fast: PyTurboJPEG (k/8)", decoder))
    else:
        skipped.append({"name": "fast: PyTurboJPEG (k/8)", "error": error})
    rows.append(planned_row("fast: torchvision decode_jpeg", JPEG_DECODERS["torchvision"], "full size"))
    rows.append(mm_fast_row())
    return rows, skipped


def time_row(row: Row, datas: list[bytes], seed: int, start: int, stop: int) -> float:
    """Seconds for one pass over ``datas[start:stop]``."""
    import torch

    torch.manual_seed(seed)  # open_clip draws from the global RNG
    generators = [torch.Generator().manual_seed(seed * 100003 + i) for i in range(start, stop)]
    begin = time.perf_counter()
    for data, generator in zip(datas[start:stop], generators, strict=True):
        row.run(data, generator)
    return time.perf_counter() - begin


# ------------------------------------------------------------------------------------------- pillow-simd child
def child_main(corpus: Path, turbojpeg_path: str | None) -> int:
    """Serve timing requests on stdin (``row seed start stop`` per line) for the pillow-simd rows; JSON replies."""
    import PIL
    import torch

    torch.set_num_threads(1)
    datas = [p.read_bytes() for p in sorted(corpus.glob("*.jpg"))]
    rows, _ = build_rows(turbojpeg_path, simd=True)
    for row in rows:
        row.run(datas[0], torch.Generator().manual_seed(0))
    print(json.dumps({"rows": [r.name for r in rows], "pil": PIL.__version__}), flush=True)
    for line in sys.stdin:
        index, seed, start, stop = map(int, line.split())
        print(json.dumps({"seconds": time_row(rows[index], datas, seed, start, stop)}), flush=True)
    return 0


class SimdChild:
    def __init__(self, python: str, corpus: Path, turbojpeg_path: str | None):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        cmd = [python, str(Path(__file__).resolve()), "--child", str(corpus)]
        if turbojpeg_path:
            cmd += ["--turbojpeg-path", turbojpeg_path]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        hello = json.loads(self.proc.stdout.readline())
        self.names, self.pil = hello["rows"], hello["pil"]

    def time(self, index: int, seed: int, start: int, stop: int) -> float:
        self.proc.stdin.write(f"{index} {seed} {start} {stop}\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["seconds"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


# ------------------------------------------------------------------------------------------------- closeness
def closeness(row: Row, reference: Row, datas: list[bytes], seed: int) -> dict:
    """Mean and max |fast - full| over the corpus (same generators → same crops), in normalised and 0-255 units,
    and the mean share of the full-size pixels the row's decoder decoded."""
    import torch

    from mm_ptft.data.transforms import create_transform

    std = torch.tensor(STD).view(3, 1, 1)
    diffs, shares = [], []
    planner = create_transform(_mm_cfg(True), SIZE, 3, MEAN, STD, True)
    for i, data in enumerate(datas):
        fast = row.run(data, torch.Generator().manual_seed(seed + i))
        full = reference.run(data, torch.Generator().manual_seed(seed + i))
        diffs.append((fast - full).abs())
        width, height, handle = row.decoder_obj.header(data)
        plan = planner.plan(width, height, torch.Generator().manual_seed(seed + i))
        _, scale = row.decoder_obj.decode(data, handle, plan, width, height)
        shares.append(scale**2)
    d = torch.stack(diffs)  # (N, 3, 224, 224) normalised units
    pixels = d * std * 255  # back to 0-255 pixel units
    return {
        "mad_normalised": d.mean().item(),
        "mad_255": pixels.mean().item(),
        "max_image_mad_255": pixels.mean(dim=(1, 2, 3)).max().item(),
        "max_abs_255": pixels.max().item(),
        "decoded_pixel_share": statistics.mean(shares),
    }


def jpeg_own_error(reference: Row, work: Path, datas: list[bytes], seed: int) -> dict:
    """The full-decode pipeline on each JPEG vs on the lossless pixels it was encoded from (same crops): what JPEG
    quality ``q`` itself changes at 224 px, for scale beside the fast path's difference."""
    import torch

    std = torch.tensor(STD).view(3, 1, 1)
    diffs = []
    for i, path in enumerate(sorted((work / "lossless").glob("*.png"))):
        png = path.read_bytes()
        jpeg = reference.run(datas[i], torch.Generator().manual_seed(seed + i))
        lossless = reference.run(png, torch.Generator().manual_seed(seed + i))
        diffs.append((jpeg - lossless).abs() * std * 255)
    d = torch.stack(diffs)
    return {"images": len(diffs), "mad_255": d.mean().item(), "max_image_mad_255": d.mean(dim=(1, 2, 3)).max().item()}


# ----------------------------------------------------------------------------------------------------- report
def print_table(result: dict) -> None:
    print(
        f"\n{SIZE} px output from {result['corpus']['images']} JPEGs (q{result['quality']}, longer side "
        f"{result['corpus']['longer_side_px'][0]}-{result['corpus']['longer_side_px'][2]} px), 1 thread, "
        f"{result['reps']} passes in {result['rounds']} interleaved rounds; loadavg {result['loadavg_start']} → "
        f"{result['loadavg_end']}"
    )
    head = f"{'pipeline':<44}{'decoder':<24}{'samples/s/core':>15}{'q1-q3':>11}{'× open_clip':>12}{'px dec.':>8}"
    head += f"{'MAD/255':>9}"
    print(head)
    print("-" * len(head))
    for r in result["rows"]:
        if "error" in r:
            print(f"{r['name']:<44}{r['error']}")
            continue
        span = f"{r['samples_per_s_q1']:.0f}-{r['samples_per_s_q3']:.0f}"
        share = f"{100 * r['decoded_pixel_share']:.0f}%" if "decoded_pixel_share" in r else "100%"
        mad = f"{r['mad_255']:.2f}" if "mad_255" in r else "-"
        print(
            f"{r['name']:<44}{r['decoder']:<24}{r['samples_per_s']:>15.1f}{span:>11}{r['x_open_clip']:>11.2f}×"
            f"{share:>8}{mad:>9}"
        )


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--reps", type=int, default=5, help="passes over the images per row")
    p.add_argument("--chunk", type=int, default=50, help="images per turn: rows take turns chunk by chunk")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--simd-python", default=None, help="python of a venv with pillow-simd (adds its rows)")
    p.add_argument("--turbojpeg-path", default=None, help="a folder with PyTurboJPEG 1.x, first on sys.path")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "decode_224-cpu.json"))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child_main(Path(args.child), args.turbojpeg_path)

    import PIL
    import torch

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="decode224_"))
    try:
        loadavg_start = _loadavg()
        print(f"writing {args.images} JPEGs to {work} …", flush=True)
        datas = [path.read_bytes() for path in make_corpus(work, args.images, args.seed, args.quality)]
        rows, skipped = build_rows(args.turbojpeg_path)
        child = SimdChild(args.simd_python, work, args.turbojpeg_path) if args.simd_python else None
        # (label, timer) per row: this process's rows, then the child's
        timers = [(r.name, lambda *a, r=r: time_row(r, datas, *a)) for r in rows]
        if child:
            timers += [(name, lambda *a, i=i: child.time(i, *a)) for i, name in enumerate(child.names)]
        for row in rows:  # warm-up: imports, first-call caches
            row.run(datas[0], torch.Generator().manual_seed(0))
        # rounds: every row takes its turn on the same chunk of images, the order rotated each round; a row's
        # samples/s is its images over its seconds, its "× open_clip" the median over rounds of its rate / open_clip's
        # rate in the same round (the same images, moments apart: load from other processes mostly cancels)
        chunks = [(i, min(i + args.chunk, len(datas))) for i in range(0, len(datas), args.chunk)]
        seconds: dict[str, list[float]] = {name: [] for name, _ in timers}
        sizes: list[int] = []
        loadavgs = []
        for rep in range(args.reps):
            for c, (start, stop) in enumerate(chunks):
                turn = rep * len(chunks) + c
                order = timers[turn % len(timers) :] + timers[: turn % len(timers)]
                for name, timer in order:
                    seconds[name].append(timer(args.seed + turn, start, stop))
                sizes.append(stop - start)
            loadavgs.append(_loadavg())
            print(f"  rep {rep + 1}/{args.reps} done, loadavg {loadavgs[-1]}", flush=True)
        if child:
            child.close()
        loadavg_end = _loadavg()
        by_name = {r.name: r for r in rows}
        reference = by_name["mm-ptft fast_decode=false"]
        base = [n / s for n, s in zip(sizes, seconds[rows[0].name], strict=True)]  # open_clip (Pillow) per round
        out_rows = []
        for name, _ in timers:
            rates = [n / s for n, s in zip(sizes, seconds[name], strict=True)]
            quartiles = statistics.quantiles(rates, n=4) if len(rates) > 1 else rates * 3
            row = by_name.get(name)
            entry = {
                "name": name,
                "decoder": row.decoder if row else "PIL full (pillow-simd)",
                "note": row.note if row else "",
                "samples_per_s": sum(sizes) / sum(seconds[name]),
                "samples_per_s_q1": quartiles[0],
                "samples_per_s_q3": quartiles[2],
                "x_open_clip": statistics.median(r / b for r, b in zip(rates, base, strict=True)),
                "round_rates": rates,
            }
            if row is not None and row.decoder_obj is not None:
                entry.update(closeness(row, reference, datas[: min(len(datas), 100)], args.seed))
            out_rows.append(entry)
        result = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "cpu": _cpu(),
            "cores_visible": os.cpu_count(),
            "threads": 1,
            "output_px": SIZE,
            "quality": args.quality,
            "corpus": corpus_stats(datas),
            "reps": args.reps,
            "chunk": args.chunk,
            "rounds": len(sizes),
            "seed": args.seed,
            "loadavg_per_rep": loadavgs,
            "loadavg_start": loadavg_start,
            "loadavg_end": loadavg_end,
            "pillow": PIL.__version__,
            "pillow_simd": child.pil if child else None,
            "torch": torch.__version__,
            "rows": out_rows + skipped,
            "jpeg_vs_lossless": jpeg_own_error(reference, work, datas, args.seed),
        }
        print_table(result)
        own = result["jpeg_vs_lossless"]
        print(
            f"JPEG q{args.quality} itself vs its lossless source (full decode, same crops): MAD "
            f"{own['mad_255']:.2f}/255, worst image {own['max_image_mad_255']:.2f}, over {own['images']} images"
        )
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        print(f"\nresults: {out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
