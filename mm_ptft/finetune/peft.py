"""Parameter-efficient policies: peft adapters (``lora``, ``ia3``) on a tower's layers, and bias-only tuning (``bias``).

The adapters go into the tower's own trunk (the timm model of an image tower, the transformers model of a text tower)
in place, with peft's :func:`peft.inject_adapter_in_model`: a targeted layer ``blocks.0.attn.qkv`` becomes a peft
layer whose weights are ``blocks.0.attn.qkv.base_layer.weight`` (frozen, the pretrained weight) and
``blocks.0.attn.qkv.lora_A.default.weight`` / ``lora_B.default.weight`` (or ``ia3_l.default``), trained. The
Trainer, DeepSpeed and the checkpoints see those names; :func:`mm_ptft.checkpoint.consolidate` merges the adapters
back into plain tower weights (what ``model.safetensors``, ``best.safetensors`` and every export hold), and
:func:`write_adapters` writes the unmerged adapters in peft's own format (``save_pretrained``).

Defaults per tower kind (``finetune.lora.target_modules`` / ``finetune.ia3.target_modules`` null):

=========  ==========================================================  ============================================
tower      lora                                                        ia3 (* = scales the layer's input)
=========  ==========================================================  ============================================
timm ViT   every Linear of the blocks (attn.qkv, attn.proj, mlp.fc1,   attn.qkv, mlp.fc2*
           mlp.fc2)
timm CNN   every Linear and ungrouped Conv2d of the trunk              every Linear* and ungrouped Conv2d*
text       every Linear of the encoder (BERT: query, key, value and    BERT: attention.self.key / value,
           the three dense; ModernBERT: Wqkv, Wo, Wi, Wo)              output.dense*; ModernBERT: attn.Wqkv, mlp.Wo*
=========  ==========================================================  ============================================
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from mm_ptft import checkpoint as ckpt
from mm_ptft.config import Config, ConfigError, FinetuneConfig
from mm_ptft.finetune.init import tower_state
from mm_ptft.models import ImageTower, TextTower
from mm_ptft.models.classifier import TowerClassifier

ADAPTER_POLICIES = ("lora", "ia3")
ADAPTER_DIR = "adapter"  # <run>/adapter: the final weights' adapters; <run>/adapter-best: best.safetensors'
# IA3 targets inside a block / layer of a transformer (name after '<list>.<index>.'): True scales the layer's input
IA3_LAYER_DEFAULTS = {
    "attn.qkv": False,  # timm ViT: keys and values (and queries: timm fuses the three)
    "mlp.fc2": True,  # timm ViT: the MLP's hidden activations
    "attention.self.key": False,  # BERT family
    "attention.self.value": False,
    "output.dense": True,  # BERT: the feed-forward output layer (the attention's is attention.output.dense)
    "attn.Wqkv": False,  # ModernBERT
    "mlp.Wo": True,
}


def _peft():
    try:
        import peft
    except ImportError:
        raise ConfigError("config: finetune.policy lora / ia3 need `pip install peft` (the finetune extra)") from None
    return peft


def trunk_of(tower: nn.Module) -> tuple[str, nn.Module]:
    """(attribute name, module) of the library model inside a tower: the timm trunk or the transformers model."""
    name = "transformer" if isinstance(tower, TextTower) else "trunk"
    return name, getattr(tower, name)


def tower_kind(tower: nn.Module) -> str:
    """``text``, ``vit`` (a timm model with patch embedding and a list of blocks) or ``cnn`` (any other timm model)."""
    if isinstance(tower, TextTower):
        return "text"
    trunk = tower.trunk
    blocks = getattr(trunk, "blocks", None)
    return "vit" if hasattr(trunk, "patch_embed") and isinstance(blocks, (nn.Sequential, nn.ModuleList)) else "cnn"


def _adaptable(module: nn.Module) -> bool:
    """A layer peft can adapt and merge back: Linear, or a Conv2d without groups (peft cannot merge grouped ones)."""
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


def _default_targets(kind: str, trunk: nn.Module, policy: str) -> dict[str, bool]:
    """name → scales its input (IA3's feed-forward layers; always False for LoRA), by the table in the docstring."""
    layers = {name: m for name, m in trunk.named_modules() if _adaptable(m)}
    if policy == "lora":
        if kind == "vit":
            return {n: False for n in layers if n.startswith("blocks.") and isinstance(layers[n], nn.Linear)}
        if kind == "text":
            return {n: False for n, m in layers.items() if isinstance(m, nn.Linear) and "embed" not in n}
        return dict.fromkeys(layers, False)
    if kind == "cnn":
        return dict.fromkeys(layers, True)
    found = {}
    for name in layers:
        match = re.fullmatch(r".*\.\d+\.(.+)", name)  # <list>.<index>.<name inside the block>
        if match and match.group(1) in IA3_LAYER_DEFAULTS:
            found[name] = IA3_LAYER_DEFAULTS[match.group(1)]
    return found


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith(f".{pattern}")  # peft's rule for a list of target names


def _resolve(patterns: list[str], trunk: nn.Module, key: str, kind: str) -> list[str]:
    """Every adaptable layer a pattern names (each pattern must name at least one)."""
    modules = dict(trunk.named_modules())
    chosen = []
    for pattern in patterns:
        hits = [n for n in modules if n and _matches(n, pattern)]
        if not hits:
            layers = [n for n, m in modules.items() if _adaptable(m)]
            raise ConfigError(
                f"config: {key}: '{pattern}' matches no layer of the {kind} tower (its {len(layers)} Linear / Conv2d "
                f"layers: {', '.join(layers[:3])}, …)"
            )
        bad = [n for n in hits if not _adaptable(modules[n])]
        if bad:
            raise ConfigError(
                f"config: {key}: '{pattern}' matches {bad[0]} ({type(modules[bad[0]]).__name__}); adapters go on "
                "Linear and ungrouped Conv2d layers"
            )
        chosen += [n for n in hits if n not in chosen]
    return chosen


def _exact(names: list[str]) -> str:
    # a regex peft full-matches against module names: exactly these layers (a plain list would also match every
    # deeper module whose name ends with one of them, e.g. 'conv1' → 'layer1.0.conv1')
    return "|".join(re.escape(n) for n in names)


def peft_config(tower: nn.Module, ft: FinetuneConfig):
    """The peft config (``peft.LoraConfig`` / ``peft.IA3Config``) of ``ft.policy`` for this tower, with the targets
    resolved to exact layer names.

    Raises:
        ConfigError: a pattern that names no layer or a layer peft cannot adapt, or no default target in this tower.
    """
    peft = _peft()
    kind, policy = tower_kind(tower), ft.policy
    _, trunk = trunk_of(tower)
    key = f"finetune.{policy}.target_modules"
    patterns = ft.lora.target_modules if policy == "lora" else ft.ia3.target_modules
    if patterns is None:
        targets = _default_targets(kind, trunk, policy)
        if not targets:
            raise ConfigError(f"config: finetune.policy={policy}: no default target in this {kind} tower; set {key}")
        names = list(targets)
    else:
        names = _resolve(patterns, trunk, key, kind)
    if policy == "lora":
        return peft.LoraConfig(
            r=ft.lora.rank, lora_alpha=ft.lora.alpha, lora_dropout=ft.lora.dropout, target_modules=_exact(names)
        )
    modules = dict(trunk.named_modules())
    if ft.ia3.feedforward_modules is not None:
        scaled_in = set(_resolve(ft.ia3.feedforward_modules, trunk, "finetune.ia3.feedforward_modules", kind))
        outside = sorted(scaled_in - set(names))
        if outside:
            raise ConfigError(f"config: finetune.ia3.feedforward_modules: {outside[0]} is not one of the targets")
    else:
        defaults = _default_targets(kind, trunk, policy)
        scaled_in = {n for n in names if defaults.get(n)}
    # a conv's output scale would be undone by the BatchNorm that follows it: convs always scale their input
    scaled_in |= {n for n in names if isinstance(modules[n], nn.Conv2d)}
    feedforward = [n for n in names if n in scaled_in]
    return peft.IA3Config(target_modules=_exact(names), feedforward_modules=_exact(feedforward) if feedforward else [])


def add_adapters(model: TowerClassifier, ft: FinetuneConfig) -> None:
    """Inject ``ft.policy``'s adapters into the tower in place; everything else in the tower is frozen.

    The tower stays in train mode (BatchNorm statistics keep updating, as under ``full``); at step 0 the adapted
    tower computes exactly what the pretrained one does (LoRA's B starts at 0, IA3's scales at 1).
    """
    peft = _peft()
    config = peft_config(model.tower, ft)
    _, trunk = trunk_of(model.tower)
    model.tower.requires_grad_(False)
    peft.inject_adapter_in_model(config, trunk)  # marks only the adapters trainable


def train_biases(model: TowerClassifier) -> None:
    """BitFit: the tower's bias terms train (norm layers' included), its weights stay frozen."""
    for name, param in model.tower.named_parameters():
        param.requires_grad = name.endswith("bias")


def is_adapter_parameter(name: str) -> bool:
    return ".lora_" in name or ".ia3_l." in name


# ---------------------------------------------------------------------------------------------------------------------
# The unmerged adapters in peft's own format
# ---------------------------------------------------------------------------------------------------------------------


def _plain_tower(cfg: Config) -> tuple[str, nn.Module]:
    """('image.' | 'text.', the run's tower built plain: its architecture, no adapters, weights to be loaded)."""
    if cfg.task == "text-classification":
        return "text.", TextTower(cfg.model.text, cfg.model.embed_dim)
    image = cfg.model.image
    saved, image.pretrained = image.pretrained, None
    try:
        return "image.", ImageTower(image, cfg.model.embed_dim)
    finally:
        image.pretrained = saved


def save_adapter(cfg: Config, state: dict[str, torch.Tensor], out_dir: Path) -> Path:
    """Write the adapters of a run's weights ``state`` (as trained: unmerged, names relative to the model) as peft's
    ``save_pretrained`` does (``adapter_config.json`` + ``adapter_model.safetensors``), for the tower's library
    model: load them with ``peft.PeftModel.from_pretrained(model, out_dir)`` where ``model`` is the timm /
    transformers model of the tower the run started from (``finetune.init``'s, e.g. exported by ``mm-ptft export``).
    A tower with BatchNorm also carries its BatchNorm layers (peft's ``modules_to_save``): the run updated their
    statistics.
    """
    peft = _peft()
    prefix, tower = _plain_tower(cfg)
    trunk_name, trunk = trunk_of(tower)
    own = tower_state(state, f"{prefix}{trunk_name}.", str(out_dir))
    config = peft_config(tower, cfg.finetune)
    # the base model as the run left it: the frozen weights of the start and, in a CNN, the updated statistics
    base = {k.replace(ckpt.BASE_LAYER, "."): v for k, v in own.items() if not is_adapter_parameter(k)}
    ckpt.load_model_weights(trunk, base, what=f"the {prefix}{trunk_name} weights for {out_dir}")
    norms = [n for n, m in trunk.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    config.modules_to_save = norms or None
    model = peft.get_peft_model(trunk, config)
    with torch.no_grad():
        inner = model.base_model.model
        for name, value in own.items():
            if is_adapter_parameter(name):
                inner.get_parameter(name).copy_(value)
    # no embedding layer is ever a target; "auto" would look the base model up on the Hub (offline here)
    model.save_pretrained(str(out_dir), save_embedding_layers=False)
    return out_dir


def write_adapters(cfg: Config, run_dir: Path, final: Path, best: Path | None) -> None:
    """``<run>/adapter`` (checkpoint ``final``'s adapters) and ``<run>/adapter-best`` (``best``'s), for a run whose
    policy adds adapters; nothing otherwise."""
    if cfg.finetune is None or cfg.finetune.policy not in ADAPTER_POLICIES:
        return
    save_adapter(cfg, ckpt.consolidate(final, merge=False), run_dir / ADAPTER_DIR)
    if best is not None:
        save_adapter(cfg, ckpt.consolidate(best, merge=False), run_dir / f"{ADAPTER_DIR}-best")
