"""Checkpoints: atomic save, resume discovery, ZeRO → fp32 consolidation, and safe loading of weights.

Layout of a run's checkpoints::

    runs/<name>/checkpoints/
        latest                      the tag of the newest complete checkpoint (moved last, atomically)
        step_00000100/              DeepSpeed's files (any ZeRO stage) +
            meta.json               step, ZeRO stage, world size, param-group names
            config.yaml             the run's resolved config (architecture checks on resume / export)
            trainer_state_rank0.pt  per rank: data-stream position, RNG state, counters (weights-only loadable)
            ema.safetensors         with train.ema_decay: the fp32 moving average of the weights (rank 0's)
        .partial-step_00000200/     a save in progress (or killed): never read, removed by the next save

A save is written under ``.partial-<tag>`` by every rank, renamed to ``<tag>`` once all ranks are done, and only
then does ``latest`` move. A kill at any point leaves the previous checkpoint loadable and named by ``latest``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import yaml

from mm_ptft.config import ConfigError

LATEST = "latest"
PARTIAL_PREFIX = ".partial-"
META = "meta.json"
EMA = "ema.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, incomplete, of another architecture, or unsafe."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so readers see either the old or the new content, never a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def is_complete(tag_dir: Path) -> bool:
    return tag_dir.is_dir() and not tag_dir.name.startswith(PARTIAL_PREFIX) and (tag_dir / META).is_file()


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (by step recorded in meta.json)."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if is_complete(p)]
    return sorted(found, key=lambda p: json.loads((p / META).read_text()).get("step", -1))


def resolve_resume(ckpt_dir: Path, resume: str) -> Path | None:
    """The checkpoint directory to resume from: ``latest`` (or the newest complete one) or a named tag/path."""
    if resume != "latest":
        path = Path(resume) if Path(resume).is_absolute() else ckpt_dir / resume
        if not is_complete(path):
            raise CheckpointError(f"checkpoint: {path} is not a complete checkpoint (no {META})")
        return path
    marker = ckpt_dir / LATEST
    if marker.is_file():
        path = ckpt_dir / marker.read_text().strip()
        if is_complete(path):
            return path
    complete = [p for p in list_checkpoints(ckpt_dir) if p.name != BEST]
    return complete[-1] if complete else None


def read_meta(tag_dir: Path) -> dict:
    try:
        return json.loads((tag_dir / META).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint: cannot read {tag_dir / META}: {e}") from None


def check_architecture(tag_dir: Path, model_cfg: dict) -> None:
    """Refuse a checkpoint whose model section differs from this run's (before any process group starts)."""
    path = tag_dir / "config.yaml"
    if not path.is_file():
        return
    saved = (yaml.safe_load(path.read_text()) or {}).get("model", {})
    diffs = _diff(saved, model_cfg)
    if diffs:
        raise CheckpointError(f"checkpoint: {tag_dir} holds another architecture ({'; '.join(diffs[:3])})")


def _diff(a, b, prefix: str = "model") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if k in (
                "lock",
                "lock_unlocked_groups",
                "lock_unlocked_layers",
                "lock_embeddings",
                "lock_norm_stats",
                "fused_attn",
                "attn_implementation",
                "pretrained",
            ):
                continue  # freezing and kernels do not change the weights' shapes
            out += _diff(a.get(k), b.get(k), f"{prefix}.{k}")
        return out
    return [] if a == b else [f"{prefix}: {a!r} vs {b!r}"]


def save_trainer_state(tag_dir: Path, rank: int, state: dict) -> None:
    torch.save(state, tag_dir / f"trainer_state_rank{rank}.pt")


def load_trainer_state(tag_dir: Path, rank: int) -> dict:
    path = tag_dir / f"trainer_state_rank{rank}.pt"
    if not path.is_file():
        raise CheckpointError(f"checkpoint: {path} missing (was the checkpoint written by as many ranks?)")
    return safe_load(path)


def safe_load(path: str | Path) -> dict:
    """``torch.load`` with the weights-only unpickler: tensors and plain containers only."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - both unsafe payloads and corrupt files end here
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint: refusing to load {path}: {first}") from None


BEST = "best"


def publish(ckpt_dir: Path, tag: str, keep_last: int, move_latest: bool = True, primary: bool = True) -> None:
    """Rename the finished ``.partial-<tag>`` into place, move ``latest``, prune old step checkpoints.

    Called by each node's local rank 0 after a barrier that every rank has passed; ``primary`` is global rank 0, the
    one that writes ``meta.json``. Another node publishes only a file system of its own: where it sees rank 0's
    ``meta.json`` in the partial (or the partial already renamed), the file system is shared and rank 0 publishes
    alone — two nodes renaming, replacing and pruning the same directories would race (one could delete the
    checkpoint the other had just put in place).
    """
    partial, final = ckpt_dir / f"{PARTIAL_PREFIX}{tag}", ckpt_dir / tag
    if not primary and (not partial.is_dir() or (partial / META).is_file()):
        return
    if partial.is_dir():
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
    if move_latest:
        atomic_write_text(ckpt_dir / LATEST, tag + "\n")
    steps = [p for p in list_checkpoints(ckpt_dir) if p.name != BEST]
    for old in steps[:-keep_last]:
        if old.name != tag:
            shutil.rmtree(old, ignore_errors=True)


def clean_partials(ckpt_dir: Path) -> None:
    if ckpt_dir.is_dir():
        for p in ckpt_dir.glob(f"{PARTIAL_PREFIX}*"):
            shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------------
# fp32 weights for fine-tuning, evaluation and export
# ---------------------------------------------------------------------------------------------------------------------


def consolidate(tag_dir: str | Path, ema: bool = True, merge: bool = True) -> dict[str, torch.Tensor]:
    """The model's fp32 weights from a DeepSpeed checkpoint of any ZeRO stage (names relative to the model).

    A run trained with ``train.ema_decay`` is its moving average (what it evaluated and selected): its checkpoints
    carry it as ``ema.safetensors`` and that is returned unless ``ema=False`` asks for the optimizer's weights.
    A run with peft adapters (``finetune.policy`` lora / ia3) comes out merged, under the plain tower's names (see
    :func:`merge_adapters`), unless ``merge=False`` asks for the weights as trained.
    """
    from mm_ptft.distributed.engine import fp32_state_dict

    tag_dir = Path(tag_dir)
    meta = read_meta(tag_dir)
    if ema and (tag_dir / EMA).is_file():
        state = load_weights(tag_dir / EMA)
    else:
        state = fp32_state_dict(tag_dir, meta.get("param_group_names"))
    prefix = meta.get("model_prefix", "model.")
    state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if merge and has_adapters(state):
        state = merge_adapters(state, _lora_alpha(tag_dir))
    return state


# ---------------------------------------------------------------------------------------------------------------------
# peft adapters in a checkpoint: merged into plain weights, or plain weights loaded into an adapted model
# ---------------------------------------------------------------------------------------------------------------------

BASE_LAYER = ".base_layer."  # peft's name for the wrapped layer: blocks.0.attn.qkv.base_layer.weight
ADAPTER_NAME = "default"  # the one adapter mm-ptft trains per layer


def _adapter_kind(name: str) -> str | None:
    if ".lora_A." in name or ".lora_B." in name:
        return "lora"
    return "ia3" if ".ia3_l." in name else None


def _adapted_layer(name: str) -> str | None:
    """The layer a peft tensor belongs to (``blocks.0.attn.qkv`` of ``blocks.0.attn.qkv.lora_A.default.weight``)."""
    for mark in (BASE_LAYER, ".lora_A.", ".lora_B.", ".ia3_l."):
        if mark in name:
            return name.split(mark)[0]
    return None


def has_adapters(state: dict[str, torch.Tensor]) -> bool:
    return any(_adapted_layer(k) is not None for k in state)


def _lora_alpha(tag_dir: Path) -> float | None:
    path = tag_dir / "config.yaml"
    data = yaml.safe_load(path.read_text()) if path.is_file() else None
    return (((data or {}).get("finetune") or {}).get("lora") or {}).get("alpha")


def _merged_layer(own: dict[str, torch.Tensor], lora_alpha: float | None, name: str) -> torch.nn.Module:
    """One peft layer rebuilt from its tensors (a Linear or Conv2d of their shapes), merged by peft itself."""
    import peft
    from torch import nn

    weight, bias = own["base_layer.weight"], own.get("base_layer.bias")
    if weight.dim() == 2:
        base = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    elif weight.dim() == 4:  # the policy only adapts ungrouped convs: in_channels = weight.shape[1]
        base = nn.Conv2d(weight.shape[1], weight.shape[0], tuple(weight.shape[2:]), bias=bias is not None)
    else:
        raise CheckpointError(f"checkpoint: cannot merge the adapter of {name} (a {weight.dim()}-d weight)")
    kinds = {_adapter_kind(f".{k}") for k in own} - {None}
    if kinds == {"lora"}:
        if lora_alpha is None:
            raise CheckpointError(f"checkpoint: {name} has a LoRA adapter but no finetune.lora.alpha in config.yaml")
        rank = own[f"lora_A.{ADAPTER_NAME}.weight"].shape[0]
        config = peft.LoraConfig(r=rank, lora_alpha=lora_alpha, target_modules=["layer"])
    elif kinds == {"ia3"}:
        scale = own[f"ia3_l.{ADAPTER_NAME}"]
        # mm-ptft's ia3 scales a conv's input; a Linear's vector says which side it scales: (1, in) or (out, 1)
        feedforward = weight.dim() == 4 or tuple(scale.shape) == (1, weight.shape[1])
        config = peft.IA3Config(target_modules=["layer"], feedforward_modules=["layer"] if feedforward else [])
    else:
        raise CheckpointError(f"checkpoint: cannot merge the adapters of {name} ({', '.join(sorted(own))})")
    holder = nn.Module()
    holder.layer = base
    peft.inject_adapter_in_model(config, holder)
    holder.layer.load_state_dict(own, strict=True)
    holder.layer.merge()
    return holder.layer.get_base_layer()


def merge_adapters(state: dict[str, torch.Tensor], lora_alpha: float | None = None) -> dict[str, torch.Tensor]:
    """The weights of a model with peft adapters (``<layer>.base_layer.weight`` + ``<layer>.lora_A.default.weight``
    … or ``<layer>.ia3_l.default``) as the same model's plain weights (``<layer>.weight``), every adapter merged in
    by peft's own merge. LoRA's scale is ``lora_alpha`` / rank.

    Raises:
        CheckpointError: an adapter of a kind or on a layer this cannot rebuild.
    """
    layers = {layer for layer in map(_adapted_layer, state) if layer is not None}
    merged = {}
    for name in sorted(layers):
        own = {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(f"{name}.")}
        if "base_layer.weight" not in own:
            raise CheckpointError(
                f"checkpoint: the weights hold {name}'s adapter but not the frozen weight it adapts "
                f"({name}.base_layer.weight); were the frozen parameters left out of the checkpoint?"
            )
        with torch.no_grad():
            layer = _merged_layer(own, lora_alpha, name)
        merged.update({f"{name}.{k}": v.detach().clone() for k, v in layer.state_dict().items()})
    out = {}
    for k, v in state.items():  # the original order, each adapted layer's tensors where its base weights were
        if BASE_LAYER in k:
            plain = k.replace(BASE_LAYER, ".")
            out[plain] = merged[plain]
        elif _adapter_kind(k) is None:
            out[k] = v
    return out


def _onto_adapters(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Plain (merged) weights mapped onto a model with peft adapters: each base layer takes the plain weights, each
    adapter the identity (LoRA's B = 0, IA3's scales = 1), so the model computes what the plain weights do."""
    out = dict(state)
    for k, v in own.items():
        plain = k.replace(BASE_LAYER, ".")
        if BASE_LAYER in k and plain in out:
            out[k] = out.pop(plain)
        elif ".lora_B." in k:
            out[k] = torch.zeros_like(v)
        elif ".ia3_l." in k:
            out[k] = torch.ones_like(v)
        elif ".lora_A." in k:
            out[k] = v.detach().clone()  # any value: B = 0 multiplies it away
    return out


def save_weights(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Atomic safetensors write (tensors made contiguous; shared storage is cloned)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in state.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_weights_with_metadata(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and string metadata of one ``.safetensors`` file, read once."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"checkpoint: cannot read {path}: {e}") from None


def find_checkpoint(source: Path) -> Path:
    """The complete checkpoint ``source`` names: itself (a tag dir), else the latest under ``source/checkpoints``
    (a run dir) or under ``source`` (a checkpoints dir).

    Raises:
        CheckpointError: there is none.
    """
    if is_complete(source):
        return source
    ckpt_dir = source / "checkpoints" if (source / "checkpoints").is_dir() else source
    tag_dir = resolve_resume(ckpt_dir, "latest")
    if tag_dir is None:
        raise CheckpointError(f"checkpoint: no complete checkpoint under {source}")
    return tag_dir


def load_weights(source: str | Path) -> dict[str, torch.Tensor]:
    """fp32 model weights from a ``.safetensors`` file, a checkpoint tag directory, a run directory (its
    ``model.safetensors``, else its latest checkpoint) or a ``.pt``/``.bin`` state dict (weights-only)."""
    path = Path(source).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint: {path} does not exist")
    if path.is_dir():
        if (path / "model.safetensors").is_file():
            return load_weights(path / "model.safetensors")
        return consolidate(find_checkpoint(path))
    if path.suffix == ".safetensors":
        return load_weights_with_metadata(path)[0]
    state = safe_load(path)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint: {path} does not hold a state dict")
    return state


def config_of(source: str | Path) -> dict | None:
    """The resolved config saved beside weights (run dir, checkpoint dir, or next to a .safetensors)."""
    path = Path(source).expanduser()
    candidates = [path / "config.yaml"] if path.is_dir() else [path.parent / "config.yaml"]
    if path.is_dir() and (path / "checkpoints").is_dir():
        latest = resolve_resume(path / "checkpoints", "latest")
        if latest is not None:
            candidates.append(latest / "config.yaml")
    for c in candidates:
        if c.is_file():
            return yaml.safe_load(c.read_text())
    return None


def saved_config(
    sources: str | Path | list[str | Path], overrides: list[str] | None = None, hint: str = "; pass --config"
):
    """The typed config saved beside the first of ``sources`` that has one (see :func:`config_of`), with dotted
    ``overrides`` applied; ``hint`` ends the error (what the caller's user can do instead).

    Raises:
        ConfigError: none of them has a config.yaml, or an override does not fit it.
    """
    from mm_ptft.config import apply_overrides, config_from_dict

    sources = sources if isinstance(sources, list) else [sources]
    for source in sources:
        data = config_of(source)
        if data is not None:
            return config_from_dict(apply_overrides(data, list(overrides or [])))
    raise ConfigError(f"config: no config.yaml beside {' or '.join(map(str, sources))}{hint}")


def load_model_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str = "checkpoint") -> None:
    """Load ``state`` strictly, turning shape / key mismatches into a one-line error. Plain weights load into a model
    with peft adapters too (merged weights into a model built as trained: the adapters become the identity)."""
    own = model.state_dict()
    if has_adapters(own) and not has_adapters(state):
        state = _onto_adapters(own, state)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} shape mismatches, e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}")
        if missing:
            parts.append(f"{len(missing)} missing keys, e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[0]}")
        raise CheckpointError(f"checkpoint: {what} does not fit this model ({'; '.join(parts)})")
    model.load_state_dict(state, strict=True)


__all__ = [
    "CheckpointError",
    "ConfigError",
    "atomic_write_text",
    "check_architecture",
    "clean_partials",
    "config_of",
    "consolidate",
    "list_checkpoints",
    "load_model_weights",
    "load_trainer_state",
    "load_weights",
    "merge_adapters",
    "publish",
    "read_meta",
    "resolve_resume",
    "safe_load",
    "save_trainer_state",
    "save_weights",
    "tag_for",
]
