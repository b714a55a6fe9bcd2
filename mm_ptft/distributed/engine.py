"""DeepSpeed: the JSON config generated from the typed config, the engine, and ZeRO checkpoint files.

Checkpoint files are always read with ``torch.load(weights_only=True)``: DeepSpeed itself would unpickle arbitrary
objects, so its reads run under :func:`safe_torch_load`, which forces the safe unpickler and allows only the few
plain DeepSpeed classes its files contain. A checkpoint carrying any other pickled object is refused.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mm_ptft.config import Config


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file holds pickled objects beyond tensors and plain containers."""


def build_ds_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON for this run. The optimizer and schedule are client objects (see train/optim.py) so no
    C++ op has to build; everything else DeepSpeed does (ZeRO, bf16 master weights, accumulation, clipping) is set
    here from the typed config, and ``deepspeed.extra`` is merged last for anything not modelled."""
    ds = cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 2:
        zero.update(overlap_comm=False, contiguous_gradients=True, reduce_scatter=True)
    if ds.zero_stage == 3:
        # small models: gather every parameter eagerly rather than thrash the prefetch bookkeeping
        zero.update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=5e7)
        # DeepSpeed's "memory efficient" linear replaces torch.nn.functional.linear for the rest of the process: a
        # later run in the same process (a sweep, a test) would then compute every linear layer differently
        zero.update(memory_efficient_linear=False)
        # DeepSpeed's default preallocates a 5e8-element gradient bucket per rank (1 GB in bf16): more than the
        # whole partitioned model state of a mid-size model. 5e6 elements keep buckets large enough to batch the
        # reduce-scatters; raise it through deepspeed.extra.zero_optimization for very large models
        zero.update(reduce_bucket_size=int(5e6))
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": ds.grad_accum_steps,
        "train_batch_size": cfg.data.batch_size * ds.grad_accum_steps * world_size,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "torch_autocast": {"enabled": ds.precision == "amp_bf16", "dtype": "bfloat16"},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,  # the client torch AdamW is fine under ZeRO
        "steps_per_print": 2**31 - 1,  # the Trainer logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
        "checkpoint": {"tag_validation": "Ignore"},
    }
    if cfg.optim.grad_clip is not None and cfg.optim.grad_clip > 0:
        config["gradient_clipping"] = cfg.optim.grad_clip
    return _merge(config, ds.extra)


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def create_engine(module: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, ds_config: dict):
    """Wrap ``module`` (a Task: model + loss) in a DeepSpeed engine with the client optimizer and scheduler."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
    )
    return engine


# ---------------------------------------------------------------------------------------------------------------------
# Safe reading of DeepSpeed checkpoint files
# ---------------------------------------------------------------------------------------------------------------------


@functools.cache
def _deepspeed_safe_globals() -> list:
    """Plain-data DeepSpeed classes that appear in its checkpoint files (no code runs on unpickling them)."""
    found = []
    candidates = [
        ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
        ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
        ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
        ("deepspeed.utils.tensor_fragment", "fragment_address"),
        ("deepspeed.runtime.zero.offload_config", "OffloadDeviceEnum"),
    ]
    import importlib

    for module_name, name in candidates:
        try:
            found.append(getattr(importlib.import_module(module_name), name))
        except (ImportError, AttributeError):
            continue
    return found


@contextlib.contextmanager
def safe_torch_load() -> Iterator[None]:
    """Within the block, every ``torch.load`` (DeepSpeed's included) uses the weights-only unpickler."""
    original = torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        try:
            with torch.serialization.safe_globals(_deepspeed_safe_globals()):
                return original(*args, **kwargs)
        except Exception as e:  # the weights-only unpickler raises UnpicklingError / RuntimeError
            if "weights_only" in str(e) or "Unsupported global" in str(e) or "WeightsUnpickler" in str(e):
                where = args[0] if args else kwargs.get("f", "?")
                detail = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise UnsafeCheckpointError(f"checkpoint: refusing to unpickle {where}: {detail}") from None
            raise

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def save_engine_checkpoint(engine, save_dir: str | Path, tag: str, client_state: dict) -> None:
    # save_latest=False: the Trainer's checkpoint module publishes the 'latest' marker after every rank is done
    engine.save_checkpoint(str(save_dir), tag=tag, client_state=client_state, save_latest=False)


def load_engine_checkpoint(engine, load_dir: str | Path, tag: str, load_optimizer: bool = True) -> dict:
    """Restore model, optimizer and scheduler in place; return the client state saved with them."""
    with safe_torch_load():
        path, client_state = engine.load_checkpoint(
            str(load_dir),
            tag=tag,
            load_optimizer_states=load_optimizer,
            load_lr_scheduler_states=load_optimizer,
            load_module_strict=True,
        )
    if path is None:
        raise FileNotFoundError(f"checkpoint: DeepSpeed found no checkpoint at {Path(load_dir) / tag}")
    return client_state or {}


def zero_stage_of(tag_dir: Path) -> int:
    names = os.listdir(tag_dir)
    if any("optim_states" in n and "zero_pp_rank" in n for n in names):
        with safe_torch_load():
            f = next(n for n in sorted(names) if "optim_states" in n)
            state = torch.load(tag_dir / f, map_location="cpu")
        stage = state["optimizer_state_dict"]["zero_stage"]
        return int(getattr(stage, "value", stage))
    return 0


def fp32_state_dict(tag_dir: str | Path, param_group_names: list[list[str]] | None = None) -> dict[str, torch.Tensor]:
    """Consolidated fp32 weights of a DeepSpeed checkpoint directory of any ZeRO stage.

    ZeRO 1/2/3: DeepSpeed's own zero_to_fp32 reassembly of the partitioned fp32 master weights.
    Stage 0: the module state; with bf16, the fp32 master copies held by the optimizer replace the bf16 weights
    (``param_group_names`` maps the optimizer's groups back to parameter names).
    """
    tag_dir = Path(tag_dir)
    if not tag_dir.is_dir():
        raise FileNotFoundError(f"checkpoint: no checkpoint directory {tag_dir}")
    if zero_stage_of(tag_dir) > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with safe_torch_load(), open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        state = {k: v.float().contiguous() for k, v in state.items()}
        # DeepSpeed records frozen parameters for stage >= 2 only: under ZeRO-1 a frozen layer (last-n, linear-probe,
        # a locked tower, an adapter's base weights) is missing here, and its (unpartitioned) module state holds it
        model_file = tag_dir / "mp_rank_00_model_states.pt"
        if model_file.is_file():
            with safe_torch_load():
                module = torch.load(model_file, map_location="cpu").get("module") or {}
            for k, v in module.items():
                if k not in state and torch.is_tensor(v) and v.numel() > 0:  # ZeRO-3 keeps empty placeholders here
                    state[k] = v.float().contiguous()
        return state
    model_file = tag_dir / "mp_rank_00_model_states.pt"
    if not model_file.is_file():
        raise FileNotFoundError(f"checkpoint: {tag_dir} has no DeepSpeed model states file")
    with safe_torch_load():
        state = torch.load(model_file, map_location="cpu")
    module = {k: v.float().contiguous() for k, v in state["module"].items()}
    fp32_groups = (state.get("optimizer") or {}).get("fp32_groups")
    if fp32_groups and param_group_names:
        for names, tensors in zip(param_group_names, fp32_groups):
            for name, tensor in zip(names, tensors):
                module[name] = tensor.float().reshape(module[name].shape).contiguous()
    return module
