"""Webdataset shards → decoded, augmented, tokenized batches (deterministic and exactly resumable)."""

from mm_ptft.data.decode import BAD_REASONS, BadSampleLog
from mm_ptft.data.loader import DataPosition, EvalStream, TrainStream, make_loader
from mm_ptft.data.shards import DataError, ShardSet, resolve_shards
from mm_ptft.data.transforms import create_transform

__all__ = [
    "BAD_REASONS",
    "BadSampleLog",
    "DataError",
    "DataPosition",
    "EvalStream",
    "ShardSet",
    "TrainStream",
    "create_transform",
    "make_loader",
    "resolve_shards",
]
