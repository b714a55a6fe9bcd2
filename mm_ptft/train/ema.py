"""An exponential moving average of the weights (timm's ``--model-ema``), kept in fp32 beside the engine.

    ema ← decay · ema + (1 − decay) · weights          after every optimizer step (``train.ema_decay``)

Parameters *and* floating-point buffers (BatchNorm statistics) are averaged, integer buffers are copied, as timm's
ModelEmaV3 does. The average is taken of the module the engine trains (bf16 under ``deepspeed.precision=bf16``: the
rounding of each snapshot averages out in the fp32 accumulator). ZeRO 0–2 keep every parameter whole on every rank,
so every rank holds the same average; ZeRO-3 partitions them and is refused by the config check.

With ``train.ema_warmup`` the decay ramps as ``min(decay, (1 + n) / (10 + n))`` over the first updates
(TensorFlow's ``ExponentialMovingAverage(num_updates=n)``), so a short run is not dominated by its start.

Why not timm's ``ModelEmaV3``: the timm installed here (1.0.31) can keep an fp32 average of a bf16 module
(``dtype=torch.float32``, mixed-dtype updates), but pyproject accepts timm from 1.0.9, and that range is not known to
have it (a plain ``torch._foreach_lerp_`` refuses fp32/bf16 pairs). This class needs only a state dict, not a deep
copy of the task, and takes the engine's module whatever its dtype.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from mm_ptft.distributed import average_tensors


class WeightEMA:
    """fp32 running average of ``module.state_dict()``; ``state`` has the module's own keys."""

    def __init__(self, module: nn.Module, decay: float, warmup: bool = False):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay, self.warmup = decay, warmup
        self.reset_to(module)
        self.float_keys = [k for k, v in self.state.items() if v.is_floating_point()]
        buffers = {k for k, _ in module.named_buffers()}
        self.buffer_keys = [k for k in self.float_keys if k in buffers]

    def reset_to(self, module: nn.Module) -> None:
        """Restart the average at ``module``'s current weights (no updates counted)."""
        self.updates = 0
        self.state = {k: _fp32(v) for k, v in module.state_dict().items()}

    def decay_at(self, updates: int) -> float:
        """The decay of the ``updates``-th update (1-based)."""
        return min(self.decay, (1 + updates) / (10 + updates)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.updates += 1
        current = module.state_dict()
        averaged = [self.state[k] for k in self.float_keys]
        weights = [current[k].detach().float() for k in self.float_keys]
        torch._foreach_lerp_(averaged, weights, 1.0 - self.decay_at(self.updates))
        for k, v in self.state.items():
            if not v.is_floating_point():
                v.copy_(current[k])

    @torch.no_grad()
    def average_buffers(self) -> None:
        """Average the floating-point buffers over ranks (each rank's BatchNorm statistics saw its own batches)."""
        average_tensors([self.state[k] for k in self.buffer_keys])

    @contextlib.contextmanager
    def applied_to(self, module: nn.Module) -> Iterator[None]:
        """Within the block ``module`` holds the averaged weights (cast to its dtypes); its own come back after."""
        own = {k: v.detach().clone() for k, v in module.state_dict().items()}
        module.load_state_dict(self.state, strict=True)
        try:
            yield
        finally:
            module.load_state_dict(own, strict=True)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.state)

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        missing = sorted(set(self.state) ^ set(state))
        if missing:
            raise KeyError(f"EMA state does not fit this model (e.g. {missing[0]})")
        for k, v in state.items():
            self.state[k].copy_(v)
        self.updates = updates


def _fp32(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t.float().clone() if t.is_floating_point() else t.clone()
