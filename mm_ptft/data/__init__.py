"""Webdataset shards → decoded, augmented, tokenized batches (deterministic and exactly resumable); class lists,
image statistics, and the decoding of detection boxes and COCO files."""

from mm_ptft.data.decode import (
    BAD_REASONS,
    BadSampleLog,
    Collator,
    ImageTextSamples,
    SampleDecoder,
    decode_image,
    decode_sample,
)
from mm_ptft.data.loader import DataPosition, EvalStream, TrainStream, make_loader
from mm_ptft.data.shards import DataError, ShardSet, resolve_shards
from mm_ptft.data.stats import image_norm_stats
from mm_ptft.data.transforms import ImageTransform, create_transform

__all__ = [
    "BAD_REASONS",
    "BadSampleLog",
    "Collator",
    "DataError",
    "DataPosition",
    "EvalStream",
    "ImageTextSamples",
    "ImageTransform",
    "SampleDecoder",
    "ShardSet",
    "TrainStream",
    "create_transform",
    "decode_image",
    "decode_sample",
    "image_norm_stats",
    "make_loader",
    "resolve_shards",
]
