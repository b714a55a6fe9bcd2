"""Write a split of a data_tools dataset in CLIP_benchmark's local webdataset layout.

    python -m data_tools clip-benchmark --src data/fmnist --split test --out data/fmnist-cb

What ``clip_benchmark eval --dataset wds/<name> --dataset_root OUT`` reads (its ``build_wds_dataset``)::

    OUT/<split>/0.tar … OUT/<split>/{N-1}.tar     <key>.<png|jpg|webp> (the source bytes, copied) + <key>.cls (label)
    OUT/<split>/nshards.txt                      N
    OUT/classnames.txt                           one class name per line, in label order
    OUT/zeroshot_classification_templates.txt    one prompt per line, ``{c}`` where the class name goes
    OUT/dataset_type.txt                         classification

Image bytes are copied, never re-encoded, so CLIP_benchmark sees exactly the pixels mm-ptft evaluates on.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from braceexpand import braceexpand

from data_tools.shards import DATASET_JSON, TMP_SUFFIX, DataToolsError, atomic_write_bytes, read_json, validate_split
from data_tools.verify import BrokenTarError, iter_tar_samples

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
DEFAULT_SHARD_SIZE = 10_000  # CLIP_benchmark's own converter's default


@dataclass
class ClipBenchmarkResult:
    """What was written: sample and shard counts, and the class names."""

    split_dir: Path
    num_samples: int
    num_shards: int
    classnames: list[str]


def _read_lines(path: Path) -> list[str]:
    try:
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DataToolsError(f"cannot read {path}: {exc}") from None


def to_clip_benchmark_template(template: str) -> str:
    """mm-ptft's ``{}`` slot → CLIP_benchmark's ``{c}`` (which it fills with ``template.format(c=name)``)."""
    if "{c}" in template:
        return template
    if "{}" not in template:
        raise DataToolsError(f"template {template!r} has no '{{}}' for the class name")
    return template.replace("{", "{{").replace("}", "}}").replace("{{}}", "{c}")


def _source_split(src: Path, split: str) -> tuple[list[Path], dict]:
    meta_path = src / DATASET_JSON
    if not meta_path.is_file():
        raise DataToolsError(f"{src} is not a data_tools dataset directory (no {DATASET_JSON})")
    meta = read_json(meta_path)
    entry = meta.get("splits", {}).get(split)
    if entry is None:
        raise DataToolsError(f"{meta_path} has no split '{split}'; splits: {', '.join(meta.get('splits', {}))}")
    shards = [src / p for p in braceexpand(entry["pattern"])]
    missing = [p for p in shards if not p.is_file()]
    if missing:
        raise DataToolsError(
            f"{len(missing)} of {len(shards)} shards of split '{split}' are missing, first: {missing[0]}"
        )
    return shards, meta


def _labelled_samples(shards: list[Path], num_classes: int):
    for shard in shards:
        try:
            for key, files in iter_tar_samples(shard):
                ext = next((e for e in IMAGE_EXTS if e in files), None)
                if ext is None:
                    raise DataToolsError(f"{shard}: sample {key} has no image ({', '.join(IMAGE_EXTS)})")
                try:
                    label = json.loads(files["json"])["label"]
                except (KeyError, ValueError, TypeError):
                    raise DataToolsError(f"{shard}: sample {key} has no integer 'label' in its json") from None
                if not isinstance(label, int) or not 0 <= label < num_classes:
                    raise DataToolsError(
                        f"{shard}: sample {key} has label {label!r}, outside the {num_classes} classes"
                    )
                yield key, ext, files[ext], label
        except BrokenTarError as exc:
            raise DataToolsError(f"{shard} is broken near sample {exc.key}: {exc}") from None


def write_clip_benchmark(
    src: Path,
    out: Path,
    split: str = "test",
    shard_size: int = DEFAULT_SHARD_SIZE,
    classnames_file: Path | None = None,
    templates_file: Path | None = None,
    overwrite: bool = False,
) -> ClipBenchmarkResult:
    """Write ``src``'s ``split`` under ``out`` in CLIP_benchmark's webdataset layout.

    Args:
        src: a data_tools dataset directory (``dataset.json`` with the split's shard pattern and class names).
        out: the CLIP_benchmark dataset root to write (``--dataset_root``).
        split: the split to convert; also the split directory CLIP_benchmark reads (``--split``).
        shard_size: samples per output tar.
        classnames_file: class names (one per line) instead of ``dataset.json``'s.
        templates_file: prompt templates (``{}`` or ``{c}``) instead of ``dataset.json``'s.
        overwrite: replace an existing ``out/<split>``.

    Raises:
        DataToolsError: a missing split, shard, label, class list or template; an existing output without overwrite.
    """
    if shard_size < 1:
        raise DataToolsError(f"--shard-size must be at least 1, got {shard_size}")
    shards, meta = _source_split(src, validate_split(split))
    classnames = _read_lines(classnames_file) if classnames_file else meta.get("classnames")
    templates = _read_lines(templates_file) if templates_file else meta.get("templates")
    if not classnames:
        raise DataToolsError(f"no class names: {src / DATASET_JSON} has none; pass --classnames FILE")
    if not templates:
        raise DataToolsError(f"no templates: {src / DATASET_JSON} has none; pass --templates FILE")
    templates = [to_clip_benchmark_template(t) for t in templates]
    split_dir = out / split
    if split_dir.exists() and not overwrite:
        raise DataToolsError(f"{split_dir} already exists; pass --overwrite to replace it")
    # the split is written whole under a temporary name and renamed at the end: never a half-converted split
    work = out / f".{split}{TMP_SUFFIX}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        num_samples, num_shards = _write_shards(work, _labelled_samples(shards, len(classnames)), shard_size)
        (work / "nshards.txt").write_text(f"{num_shards}\n")
        if split_dir.exists():
            shutil.rmtree(split_dir)
        os.replace(work, split_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    atomic_write_bytes(out / "classnames.txt", "".join(f"{c}\n" for c in classnames).encode("utf-8"))
    text = "".join(f"{t}\n" for t in templates)
    atomic_write_bytes(out / "zeroshot_classification_templates.txt", text.encode("utf-8"))
    atomic_write_bytes(out / "dataset_type.txt", b"classification\n")
    return ClipBenchmarkResult(split_dir, num_samples, num_shards, list(classnames))


def _write_shards(split_dir: Path, samples, shard_size: int) -> tuple[int, int]:
    # Imported here because webdataset pulls in torch, which would make `import data_tools` slow.
    from webdataset import TarWriter

    count, shard, writer, stream = 0, -1, None, None
    try:
        for key, ext, image, label in samples:
            if writer is None or count % shard_size == 0:
                if writer is not None:
                    writer.close()
                    stream.close()
                shard += 1
                stream = (split_dir / f"{shard}.tar").open("wb")
                writer = TarWriter(stream, encoder=False, mtime=0)
            writer.write({"__key__": key, ext: image, "cls": str(label).encode()})
            count += 1
    finally:
        if writer is not None:
            writer.close()
            stream.close()
    if count == 0:
        raise DataToolsError("the split has no samples")
    return count, shard + 1
