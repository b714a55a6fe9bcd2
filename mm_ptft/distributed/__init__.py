"""Everything that knows there is more than one process: the process group, rank helpers, collectives, DeepSpeed.

This package is the only place that imports deepspeed (a design-rule test enforces it). Model, loss and data code
stay single-device; the Trainer calls in here to wrap them.
"""

from mm_ptft.distributed.comm import (
    DistInfo,
    all_gather_tensor,
    all_reduce_max,
    all_reduce_sum,
    any_true,
    average_buffers,
    average_tensors,
    barrier,
    broadcast_object,
    get_rank,
    get_world_size,
    init_distributed,
    is_main_process,
    print0,
)

__all__ = [
    "DistInfo",
    "all_gather_tensor",
    "all_reduce_max",
    "all_reduce_sum",
    "average_buffers",
    "average_tensors",
    "any_true",
    "barrier",
    "broadcast_object",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_main_process",
    "print0",
]
