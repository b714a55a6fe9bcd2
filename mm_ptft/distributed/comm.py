"""Process group set-up and the few collectives the Trainer and evaluators need."""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(backend: str | None = None, local_rank: int | None = None, timeout_s: int = 900) -> DistInfo:
    """Join (or create) the process group the launcher described, via DeepSpeed's comm layer.

    Works under the ``deepspeed`` launcher (``--local_rank`` / LOCAL_RANK), ``torchrun`` (RANK, WORLD_SIZE, …),
    SLURM (through the launch scripts, which export the torchrun variables) and plain ``python`` (a 1-process group).
    On a machine without CUDA the DeepSpeed accelerator is ``cpu`` and the backend ``gloo``.
    """
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if local_rank is not None and local_rank >= 0:
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
    if "RANK" not in os.environ:  # plain `python`: a group of one, so DeepSpeed and collectives still work
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    backend = backend or ("nccl" if cuda else "gloo")
    if not dist.is_initialized():
        import deepspeed

        if not cuda:
            _skip_shared_memory_allreduce()
        deepspeed.init_distributed(
            dist_backend=backend, auto_mpi_discovery=False, timeout=datetime.timedelta(seconds=timeout_s)
        )
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world)))
    if cuda:
        torch.cuda.set_device(local)
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    return DistInfo(rank, world, local, local_world, device)


# DeepSpeed's op for its shared-memory all-reduce on CPU (deepspeed/ops/op_builder/cpu/comm.py)
DS_SHM_COMM_OP = "deepspeed_shm_comm"


def _skip_shared_memory_allreduce() -> None:
    """Keep DeepSpeed's CPU backend from building and starting its shared-memory all-reduce op.

    On CPU, DeepSpeed's comm layer JIT-compiles that C++ op when it initialises (about a minute of g++, repeated
    whenever the build command changes, e.g. another checkout's venv path) and, under its launcher, maps a 69 MB
    /dev/shm segment per rank that nothing unlinks: ~150 two-rank launches held 20 GB of RAM. Only
    ``deepspeed.comm.inference_all_reduce`` (tensor-parallel inference) uses the op; ZeRO training's collectives go
    through gloo, so the op is marked incompatible, which DeepSpeed's backend reads as "fall back to gloo".
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[DS_SHM_COMM_OP] = False


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def print0(*args, **kwargs) -> None:
    if is_main_process():
        print(*args, **kwargs, flush=True)


def barrier() -> None:
    if get_world_size() > 1:
        dist.barrier()


def _comm_device(tensor: torch.Tensor) -> torch.device:
    """Where a collective can take ``tensor``: NCCL moves only CUDA tensors (host-side counters go over and back)."""
    if tensor.device.type == "cpu" and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if get_world_size() > 1:
        out = tensor.to(_comm_device(tensor), copy=True)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        tensor = out.to(tensor.device)
    return tensor


def average_buffers(module: torch.nn.Module) -> None:
    """Average the floating-point buffers (BatchNorm running statistics) of ``module`` over ranks, in place.

    DeepSpeed leaves each rank's buffers as its own batches made them. Before an evaluation or a save every rank
    must hold the same ones: otherwise ranks evaluate different models, and the checkpoint (rank 0's buffers) is
    not the model that was evaluated.
    """
    average_tensors([b for b in module.buffers() if b.is_floating_point()])


def average_tensors(tensors: list[torch.Tensor]) -> None:
    """Replace each floating-point tensor by its mean over ranks, in place (summed in fp32)."""
    world = get_world_size()
    if world == 1:
        return
    with torch.no_grad():
        for t in tensors:
            total = t.detach().float().to(_comm_device(t), copy=True)
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
            t.copy_(total / world)


def all_reduce_max(value: float) -> float:
    if get_world_size() == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64)
    t = t.to(_comm_device(t))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def any_true(flag: bool) -> bool:
    """True on every rank when it is true on any rank (keeps ranks in lock-step over uneven data)."""
    t = all_reduce_sum(torch.tensor([1.0 if flag else 0.0]))
    return bool(t.item() > 0)


def all_gather_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` (N_r, ...) from every rank along dim 0; ranks may hold different N_r."""
    world = get_world_size()
    if world == 1:
        return tensor
    device = _comm_device(tensor)
    n = torch.tensor([tensor.shape[0]], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]), device=device)
    padded[: tensor.shape[0]] = tensor
    out = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return torch.cat([o[:s] for o, s in zip(out, sizes)]).to(tensor.device)


def broadcast_object(obj, src: int = 0):
    if get_world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]
