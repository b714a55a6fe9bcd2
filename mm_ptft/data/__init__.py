"""Webdataset shards → decoded, augmented, tokenized batches (deterministic and exactly resumable)."""

from mm_ptft.data.decode import BAD_REASONS, BadSampleLog, Collator, SampleDecoder, decode_image, decode_sample
from mm_ptft.data.loader import DataPosition, EvalStream, TrainStream, make_loader
from mm_ptft.data.shards import DataError, ShardSet, resolve_shards
from mm_ptft.data.transforms import create_transform

__all__ = [
    "BAD_REASONS",
    "BadSampleLog",
    "Collator",
    "DataError",
    "DataPosition",
    "EvalStream",
    "SampleDecoder",
    "ShardSet",
    "TrainStream",
    "create_transform",
    "decode_image",
    "decode_sample",
    "make_loader",
    "resolve_shards",
]
