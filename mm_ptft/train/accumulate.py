"""Gradient accumulation: how one optimizer step is taken over ``deepspeed.grad_accum_steps`` micro-batches.

``PlainAccumulation`` back-propagates each micro-batch's own loss (exact for losses that are a mean over samples:
classification, detection). A contrastive loss is not: each micro-batch loss sees only its micro-batch × ranks of
negatives, so k accumulated micro-batches are not one batch k times larger.

``CachedAccumulation`` (GradCache, Gao et al. 2021) makes them one batch, exactly:

1. every micro-batch is forwarded without gradient, tower by tower, and its features are cached; the random state
   before each tower's forward is recorded (dropout, drop-path, patch dropout draw from it);
2. the features of all micro-batches of all ranks are gathered, and the loss over the whole global batch and its
   gradient with respect to every feature are computed once (``mm_ptft.losses.feature_gradients``, in row blocks);
3. each micro-batch is forwarded again with gradient, from the recorded random states (so the same dropout masks),
   and back-propagated through the DeepSpeed engine with its cached feature gradient:
   ``backward(Σ feature · gradient)``. ZeRO 0–3, bf16, clipping and the optimizer step work as for any backward.

A tower whose trunk does not train (LiT's locked image tower, its projection trainable) runs its trunk once: the
first pass keeps the trunk's pooled output, the second runs only the projection on it. Floating-point buffers
(BatchNorm statistics) are restored after the first pass, so they advance once per micro-batch, as in plain
accumulation. Peak memory is one micro-batch's activations plus the cached features and inputs of the step: the
global batch is bounded by time, not memory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol, runtime_checkable

import torch
from torch import nn

from mm_ptft.config import ConfigError
from mm_ptft.distributed import all_gather_tensor, all_reduce_sum
from mm_ptft.losses import feature_gradients

Batch = dict
NextBatch = Callable[[], Batch]


@runtime_checkable
class FeatureCachedTask(Protocol):
    """What cached accumulation needs of a task: named towers and their output features; a forward that runs
    only some of them (``forward(batch, towers=(…), return_pooled=…)``) and takes a frozen trunk's cached output as
    ``batch["{tower}_pooled"]``; the towers whose trunk does not train; and a loss that takes part in
    :func:`mm_ptft.losses.feature_gradients`."""

    towers: dict[str, str]
    loss: nn.Module

    def frozen_trunks(self) -> set[str]: ...


class PlainAccumulation:
    """k micro-batch losses, each back-propagated on its own (DeepSpeed scales each by 1/k)."""

    cached = False

    def __init__(self, engine, steps: int, to_device: Callable[[Batch], Batch]):
        self.engine, self.steps, self.to_device = engine, steps, to_device

    def step(self, next_batch: NextBatch) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for _ in range(self.steps):
            out = self.engine(self.to_device(next_batch()))
            self.engine.backward(out["loss"])
            self.engine.step()
            for k, v in out.items():
                metrics[k] = metrics.get(k, 0.0) + float(v.detach().float()) / self.steps
        return metrics


class _RandomState:
    """The global generators dropout and friends draw from: the CPU one, and the accelerator's."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def get(self):
        return torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if self.cuda else None

    def set(self, state) -> None:
        torch.set_rng_state(state[0])
        if self.cuda:
            torch.cuda.set_rng_state(state[1], self.device)


class _Rows:
    """Rows of one tensor, micro-batch after micro-batch, in one tensor allocated at the first micro-batch for the
    whole step (``dtype``: that of the rows, or the one given). Kept as k small tensors, each allocated between the
    first pass's activations, the cached features pinned scattered pages of the host heap for the whole step, and
    the second pass's activations could not reuse the holes: measured at k = 32 on the CPU allocator, +11.9 % over
    one micro-batch's peak before, +9.2 % after (docs/performance.md)."""

    def __init__(self, steps: int, dtype: torch.dtype | None = None):
        self.steps, self.dtype, self.n, self.buf = steps, dtype, 0, None

    def append(self, x: torch.Tensor) -> None:
        dtype = self.dtype or x.dtype
        if self.buf is None:
            self.buf = x.new_empty((self.steps * x.shape[0], *x.shape[1:]), dtype=dtype)
        if self.n + x.shape[0] > self.buf.shape[0]:  # a micro-batch larger than the first one: grow
            self.buf = torch.cat([self.buf[: self.n], x.new_empty((self.buf.shape[0], *x.shape[1:]), dtype=dtype)])
        self.buf[self.n : self.n + x.shape[0]] = x
        self.n += x.shape[0]

    def rows(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return self.buf[start : self.n if stop is None else stop]


class _Span(NamedTuple):
    """Where a micro-batch's rows of one key lie in its :class:`_Rows`."""

    start: int
    stop: int


class _Inputs:
    """The step's micro-batches as the loader gave them, for the second pass: every tensor with a row per sample
    copied into one :class:`_Rows` per key (the loader's own tensor is then free for the allocator to reuse; held
    as k batches they would pin the heap as the cached features did), anything else kept as it is."""

    def __init__(self, steps: int):
        self.steps = steps
        self.rows: dict[str, _Rows] = {}
        self.batches: list[dict] = []  # per micro-batch: key -> its _Span in self.rows[key], or the value

    def append(self, batch: Batch) -> None:
        n = next((v.shape[0] for v in batch.values() if torch.is_tensor(v) and v.dim() > 0), None)
        kept = {}
        for key, value in batch.items():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == n:
                rows = self.rows.setdefault(key, _Rows(self.steps))
                if rows.buf is None or (rows.buf.dtype == value.dtype and rows.buf.shape[1:] == value.shape[1:]):
                    kept[key] = _Span(rows.n, rows.n + n)
                    rows.append(value)
                    continue
            kept[key] = value
        self.batches.append(kept)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, j: int) -> Batch:
        return {
            key: self.rows[key].rows(*value) if isinstance(value, _Span) else value
            for key, value in self.batches[j].items()
        }


class CachedAccumulation:
    """One loss over every micro-batch of every rank, exact gradient (see the module docstring)."""

    cached = True

    def __init__(
        self, engine, task: FeatureCachedTask, steps: int, to_device: Callable[[Batch], Batch], device, rank: int
    ):
        self.engine, self.task, self.steps, self.to_device, self.rank = engine, task, steps, to_device, rank
        self.rng = _RandomState(torch.device(device))

    def step(self, next_batch: NextBatch) -> dict[str, float]:
        task, engine = self.task, self.engine
        towers = list(task.towers)
        frozen = task.frozen_trunks()
        micro, states, trunks, sizes = _Inputs(self.steps), [], [], []
        features = {t: _Rows(self.steps, torch.float32) for t in towers}
        buffers = {name: b.clone() for name, b in task.named_buffers()}
        with torch.no_grad():
            for _ in range(self.steps):
                batch = next_batch()
                micro.append(batch)  # kept on the host as the loader gave it; moved to the device per forward
                on_device = self.to_device(batch)
                states.append({})
                trunks.append({})
                for t in towers:
                    states[-1][t] = self.rng.get()
                    out = engine(on_device, towers=(t,), return_pooled=t in frozen)
                    features[t].append(out[task.towers[t]])
                    if t in frozen:  # the projection alone runs again, from the trunk's output
                        trunks[-1][f"{t}_pooled"] = out[f"{t}_pooled"]
                sizes.append(out[task.towers[towers[-1]]].shape[0])
        end_state = self.rng.get()
        for name, b in task.named_buffers():  # BatchNorm statistics advance in the gradient pass only
            b.copy_(buffers[name])

        grads, loss = self._feature_gradients(features, out)
        del features, batch, on_device  # the second pass needs only the inputs and the feature gradients
        offsets = [0]
        for n in sizes:
            offsets.append(offsets[-1] + n)
        for j in range(len(micro)):
            on_device = self.to_device(micro[j]) | trunks[j]
            terms = []
            for t in towers:
                self.rng.set(states[j][t])
                out = engine(on_device, towers=(t,))
                term = (out[task.towers[t]].float() * grads[t][offsets[j] : offsets[j + 1]]).sum()
                if term.requires_grad:  # a frozen trunk under a projection that has no parameter: a constant
                    terms.append(term)
            for key in ("logit_scale", "logit_bias"):
                if grads.get(key) is not None:  # their gradient spread evenly so every micro-step reaches them
                    terms.append((out[key].float() * grads[key] / self.steps).sum())
            # the feature gradients already hold the whole step's loss: no 1/k scaling by DeepSpeed
            engine.backward(sum(terms), scale_wrt_gas=False)
            engine.step()
        self.rng.set(end_state)
        metrics = {"loss": float(loss)}
        for key in ("logit_scale", "logit_bias"):
            if key in out:
                metrics[key] = float(out[key].detach().float())
        return metrics

    def _feature_gradients(self, features: dict[str, _Rows], out: dict) -> tuple[dict, torch.Tensor]:
        """This rank's share of the global-batch loss and the gradient of every feature it owns."""
        task = self.task
        image_key, text_key = task.towers["image"], task.towers["text"]
        local = {t: f.rows() for t, f in features.items()}
        n_local = local["image"].shape[0]
        sizes = all_gather_tensor(torch.tensor([n_local], device=local["image"].device))
        start = int(sizes[: self.rank].sum().item())  # gathered in rank order
        own = slice(start, start + n_local)
        gathered = {t: all_gather_tensor(f) for t, f in local.items()}
        loss, grads = feature_gradients(
            task.loss, gathered["image"], gathered["text"], out["logit_scale"], out.get("logit_bias"), own
        )
        world = sizes.numel()
        by_tower = {}
        for t, key in (("image", image_key), ("text", text_key)):
            g = grads[key]
            if world > 1 and task.loss.grad_reduction == "sum":
                g = all_reduce_sum(g)
            elif world > 1 and task.loss.grad_reduction == "replicated":
                g = g * world
            by_tower[t] = g[own].clone()  # this rank's rows only: the N × D gradient is freed here
        by_tower["logit_scale"], by_tower["logit_bias"] = grads["logit_scale"], grads["logit_bias"]
        return by_tower, loss


def create_accumulation(cfg, task: nn.Module, engine, to_device: Callable[[Batch], Batch], device, rank: int):
    """Cached accumulation for a contrastive task with ``loss.accumulation=cached`` (the default) and more than one
    micro-batch per step; plain otherwise."""
    steps = cfg.deepspeed.grad_accum_steps
    if steps > 1 and isinstance(task, FeatureCachedTask) and cfg.loss.accumulation == "cached":
        missing = [m for m in ("rows", "rows_loss", "grad_reduction") if not hasattr(task.loss, m)]
        if missing:
            raise ConfigError(
                f"config: loss.name={cfg.loss.name} has no {', '.join(missing)} for loss.accumulation=cached "
                "(see mm_ptft.losses.feature_gradients); set loss.accumulation=plain"
            )
        return CachedAccumulation(engine, task, steps, to_device, device, rank)
    return PlainAccumulation(engine, steps, to_device)


def negatives_per_loss(cfg, task: nn.Module, world: int, cached: bool) -> int | None:
    """How many negatives each sample of a contrastive loss is scored against (None for other tasks)."""
    if not isinstance(task, FeatureCachedTask):
        return None
    pairs = cfg.data.batch_size * world * (cfg.deepspeed.grad_accum_steps if cached else 1)
    return pairs - 1
