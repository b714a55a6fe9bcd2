"""Typed, nested run configuration.

Every setting lives in one dataclass field, typed and commented once. A run's config comes from a YAML file
(optionally inheriting from another with ``base: other.yaml``) plus dotted command-line overrides
(``train.steps=200 model.image.name=resnet18``). Unknown keys and wrong types are rejected with a one-line
:class:`ConfigError` naming the key and the valid choices; the resolved config is saved into the run directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config problem a person can fix: the message names the key and what is allowed."""


# ---------------------------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class ImageTowerConfig:
    name: str = "vit_tiny_patch16_224"  # any timm model name (random init unless `pretrained` names a local file)
    kwargs: dict[str, Any] = field(default_factory=dict)  # to timm.create_model: patch_size, depth, …
    image_size: int = 224  # input side; passed to timm as img_size for models that take it (ViTs), used by transforms
    in_chans: int = 3  # 3 = RGB, 1 = grayscale
    pretrained: str | None = None  # local .safetensors/.pth/.bin state dict of the timm model (never a hub download)
    pool: str | None = None  # timm global_pool ('avg', 'token', 'map', …); None keeps the model's default
    proj: Literal["linear", "mlp", "none"] = "linear"  # head from pooled features to the joint embedding
    proj_bias: bool = False
    # FLIP: drop this fraction of the patch tokens at random in training (timm ViTs' patch_drop_rate); 0 at eval
    patch_dropout: float = 0.0
    lock: bool = False  # freeze the tower (LiT) …
    lock_unlocked_groups: int = 0  # … except its last N layer groups (timm group_matcher blocks; head counts as one)
    lock_norm_stats: bool = False  # keep BatchNorm running stats frozen when locked (CNN towers)


@dataclass
class TextTowerConfig:
    pretrained: str | None = None  # local HF model dir, or a known local alias ('minilm-l6'); None → random init
    config: dict[str, Any] = field(default_factory=dict)  # transformers config (with model_type) for random init
    tokenizer: str | None = None  # local HF tokenizer dir or alias; None → the `pretrained` path
    context_length: int = 32  # tokens per caption (padded / truncated)
    pool: Literal["cls", "mean", "last"] = "cls"  # how token states become one vector
    proj: Literal["linear", "mlp", "none"] = "linear"
    proj_bias: bool = False
    attn_implementation: str | None = None  # transformers kernel; None → 'eager' on CPU (faster), else sdpa
    trust_remote_code: bool = False  # only for a local model whose code you have read
    lock: bool = False  # freeze the tower …
    lock_unlocked_layers: int = 0  # … except its last N transformer layers
    lock_embeddings: bool = True  # when locking with unlocked layers, keep the embeddings frozen too


@dataclass
class ModelConfig:
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    embed_dim: int = 512  # joint embedding width
    logit_scale_init: float = 1 / 0.07  # initial temperature (stored as its log, like CLIP)
    logit_scale_max: float = 100.0  # clamp of exp(logit_scale)
    logit_bias_init: float | None = None  # set (e.g. -10) to learn a logit bias, as SigLIP does
    fused_attn: bool | None = None  # timm fused attention; None → off on CPU (the math kernel is faster there)


@dataclass
class LossConfig:
    name: str = "clip"  # registered loss: 'clip' (InfoNCE) or 'siglip'
    local_loss: bool = False  # InfoNCE over local rows × all columns (less memory, same gradient)
    gather_with_grad: bool = True  # all-gather features with gradient (exact global-batch gradient)
    # with deepspeed.grad_accum_steps > 1: 'cached' computes one loss over every micro-batch of every rank (each
    # sample sees the global batch's negatives, exact gradient: GradCache); 'plain' sums k independent micro-batch
    # losses (each sees micro-batch × ranks negatives only)
    accumulation: Literal["cached", "plain"] = "cached"


@dataclass
class ImageTransformConfig:
    mean: list[float] | None = None  # None → the timm model's pretrained_cfg mean (per in_chans)
    std: list[float] | None = None
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bicubic"
    train_scale: list[float] = field(default_factory=lambda: [0.9, 1.0])  # RandomResizedCrop area range
    train_ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333])
    hflip: float = 0.0  # horizontal flip probability in training
    re_prob: float = 0.0  # random erasing probability in training (a rectangle of 2-33 % of the area → noise)
    # training: decode a JPEG at the reduced DCT size its planned crop needs, resize in torch (tests state the bound
    # on the difference); false → full PIL decode, bit-equal to torchvision's transforms
    fast_decode: bool = True


@dataclass
class SourceConfig:
    """One source of a training mixture (``data.train: [{path: …, weight: …}, …]``)."""

    path: str  # a dataset dir or a shard pattern, local or remote (http(s)://, s3://, pipe:)
    weight: float = 1.0  # share of the samples drawn from this source (weights are normalised over the sources)
    split: str | None = None  # split inside a dataset dir; None → data.train_split
    name: str | None = None  # the source's name in metrics and the report; None → derived from the path


@dataclass
class RemoteConfig:
    """How remote shards (http(s)://, s3://, other fsspec URLs) are read: bounded retries, never a hang."""

    timeout_s: float = 60.0  # a connect or read that waits longer than this fails (then is retried)
    retries: int = 3  # attempts after the first for one shard (a failed read resumes at the byte it stopped at)
    backoff_s: float = 1.0  # wait before retry i is backoff_s × 2^i (capped at 30 s)


@dataclass
class DataConfig:
    # a shard pattern (brace-expanded) or a dataset dir written by data_tools (+ split), local or remote; or a list
    # of weighted sources, each one of those, mixed sample by sample in proportion to their weights
    train: str | list[SourceConfig] | None = None
    train_split: str = "train"  # split inside a dataset dir
    num_samples: int | None = None  # samples per epoch; None → sizes.json of the shards
    resampled: bool = False  # draw shards with replacement (web-scale) instead of a permutation per epoch
    shuffle: bool = True
    shuffle_group: int = 2  # shards read into one shuffle group (exact resume needs only the group index)
    batch_size: int = 128  # per rank (micro-batch)
    workers: int = 1  # DataLoader workers per rank
    prefetch: int = 4  # batches prefetched per worker
    max_bad_fraction: float = 0.05  # stop with an error when more than this fraction of samples is bad
    image_keys: list[str] = field(default_factory=lambda: ["jpg", "jpeg", "png", "webp"])
    caption_key: str = "txt"
    max_caption_chars: int = 4096  # longer captions count as bad samples (a guard against garbage)
    image: ImageTransformConfig = field(default_factory=ImageTransformConfig)
    remote: RemoteConfig = field(default_factory=RemoteConfig)


@dataclass
class EvalDataConfig:
    """One more held-out dataset a training run evaluates beside ``eval.data`` (``eval.also``)."""

    data: str  # held-out shards (pattern or dataset dir), local or remote
    split: str = "test"
    name: str | None = None  # prefix of its metrics ('<name>/zeroshot/acc1'); None → dataset.json name or dir name
    classnames: list[str] | str | None = None  # None → its dataset.json
    templates: list[str] | str | None = None


@dataclass
class EvalConfig:
    data: str | None = None  # held-out shards (pattern or dataset dir); None → no evaluation
    split: str = "test"
    every: int = 0  # evaluate every N steps (0 → only at the end)
    at_start: bool = False  # also evaluate before the first step (fine-tuning: the start competes for `best`)
    batch_size: int = 256
    max_samples: int | None = None  # cap on held-out samples (quick evals)
    evaluators: list[str] = field(default_factory=lambda: ["zeroshot", "retrieval"])  # registered in mm_ptft.eval
    classnames: list[str] | str | None = None  # list, or a file with one per line; None → dataset.json
    templates: list[str] | str | None = None  # list, or a file; each with '{}' for the class name
    # more held-out datasets, each evaluated by the same evaluators with its own classes; their metrics are logged as
    # '<name>/<metric>' (e.g. a mixture's second source: also: [{data: data/openclipart, name: openclipart}])
    also: list[EvalDataConfig] = field(default_factory=list)
    select_metric: str | None = None  # logged eval metric (e.g. 'classification/acc1') that picks the best checkpoint
    select_mode: Literal["max", "min"] = "max"
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-evaluator settings, e.g.
    # {linear_probe: {max_train_samples: 5000}, coco: {draw_images: 2}}; each evaluator declares its own keys


@dataclass
class OptimConfig:
    name: Literal["adamw", "sgd"] = "adamw"  # torch AdamW (decoupled decay), or torch SGD with momentum (coupled decay)
    lr: float = 1e-3
    weight_decay: float = 0.2  # not applied to norms, biases, embeddings' positional tokens, logit scale/bias
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])  # adamw
    eps: float = 1e-6  # adamw
    momentum: float = 0.9  # sgd
    nesterov: bool = True  # sgd
    image_lr_scale: float = 1.0  # per-tower learning-rate multipliers
    text_lr_scale: float = 1.0
    layer_decay: float | None = None  # layer-wise lr decay (fine-tuning); None → off
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0  # final lr = lr × min_lr_ratio
    grad_clip: float | None = 1.0


@dataclass
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = 0
    # bf16: DeepSpeed bf16 (bf16 weights, fp32 master copy in the optimizer); amp_bf16: torch autocast over fp32
    # weights (DeepSpeed's torch_autocast, as open_clip's amp_bf16); fp32: no reduced precision
    precision: Literal["bf16", "amp_bf16", "fp32"] = "bf16"
    grad_accum_steps: int = 1
    activation_checkpointing: bool = False  # recompute tower blocks in backward (timm / transformers checkpointing)
    backend: str | None = None  # process-group backend; None → nccl on CUDA, gloo on CPU
    timeout_s: int = 900  # a collective waiting longer than this fails instead of hanging (e.g. a rank died)
    extra: dict[str, Any] = field(default_factory=dict)  # merged last into the generated DeepSpeed JSON


@dataclass
class TrainConfig:
    output_dir: str = "runs"
    name: str | None = None  # run directory name; None → the config file's stem
    steps: int | None = None  # optimizer steps; None → `epochs` × samples per epoch / global batch
    epochs: float = 1.0
    seed: int = 0
    log_every: int = 10
    save_every: int = 0  # checkpoint every N steps (0 → only at the end)
    keep_last: int = 2  # checkpoints kept on disk
    early_stop_patience: int = 0  # stop after N evaluations without improving eval.select_metric (0 → never)
    ema_decay: float | None = None  # keep an fp32 EMA of the weights (timm's --model-ema); it is what evaluations
    # score, best.safetensors / model.safetensors hold and consolidation returns. None → off. ZeRO 0-2
    ema_warmup: bool = False  # ramp the EMA decay as min(decay, (1 + n) / (10 + n)) over the first updates
    resume: str | None = None  # 'latest' or a checkpoint tag
    threads: int | None = 1  # torch threads per rank (1 is best when ranks share the cores)
    progress: bool = True
    tensorboard: bool = True
    report: bool = True
    consolidate: bool = True  # write a consolidated fp32 model.safetensors at the end
    record_keys: bool = False  # append each rank's consumed sample keys to keys_rank<r>.jsonl (data audits, tests)
    stop_after: int | None = None  # end the process after N steps without finishing (tests of interrupted runs)


@dataclass
class LoraConfig:
    """``finetune.lora``: low-rank adapters (peft LoRA) on the tower's layers; W + (alpha / rank) · B A."""

    rank: int = 8  # r of every adapter (A: rank × in, B: out × rank; B starts at 0, so step 0 is the pretrained tower)
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapters' input, in [0, 1)
    # module names (or name endings, as peft matches them: 'attn.qkv' matches 'blocks.0.attn.qkv') inside the timm
    # trunk / transformers model; None → per tower kind: every Linear of a ViT's blocks or a text encoder's layers,
    # every Linear and ungrouped Conv2d of a CNN (mm_ptft/finetune/peft.py)
    target_modules: list[str] | None = None


@dataclass
class IA3Config:
    """``finetune.ia3``: (IA)³ (peft IA3): learned per-channel scales of some layers' outputs (or inputs)."""

    # module names or name endings, as for LoRA; None → keys / values and the MLP's output layer of each block (ViT,
    # BERT, ModernBERT), every ungrouped Conv2d of a CNN
    target_modules: list[str] | None = None
    # the targets whose input (not output) is scaled (IA3's feed-forward scale); None → the MLP output layers of the
    # defaults. A CNN's convs always scale their input: a scale of a conv's output is undone by the BatchNorm after it
    feedforward_modules: list[str] | None = None


@dataclass
class FinetuneConfig:
    init: str | None = None  # pretrained weights: run dir, checkpoint dir (any ZeRO stage), .safetensors; None → none
    # what trains besides the head (mm_ptft/finetune): lora / ia3 add peft adapters (merged into the tower in
    # model.safetensors and consolidation); bias trains the tower's bias terms only (BitFit)
    policy: Literal["linear-probe", "last-n", "full", "lora", "ia3", "bias"] = "full"
    unlocked_groups: int = 2  # last-n: trailing layer groups of the tower that train (image: timm groups; text: layers)
    head_init: Literal["random", "zeroshot"] = "random"  # zeroshot: class-name embeddings of the text tower (image)
    head_input: Literal["pooled", "embedding"] | None = None  # pooled trunk features or the L2-normalised projected
    # embedding; None → embedding with a zero-shot head, else pooled
    classnames: list[str] | str | None = None  # list or file (one per line); None → eval.classnames / dataset.json
    num_classes: int | None = None  # when no class names are known (random head only)
    label_smoothing: float = 0.0
    mixup: float = 0.0  # mixup alpha (0 → off); mixup/cutmix need an even per-rank batch
    cutmix: float = 0.0  # cutmix alpha (0 → off)
    mixup_prob: float = 1.0  # probability a batch is mixed
    lora: LoraConfig = field(default_factory=LoraConfig)  # policy lora
    ia3: IA3Config = field(default_factory=IA3Config)  # policy ia3


@dataclass
class DetectionConfig:
    init: str | None = None  # pretraining weights (run dir, checkpoint dir, .safetensors) whose image.* start the tower
    head: Literal["faster_rcnn", "retinanet", "fcos"] = "faster_rcnn"  # torchvision detector on the tower's FPN
    policy: Literal["frozen", "last-n", "full"] = "full"  # what of the tower trains (the FPN and head always do)
    unlocked_groups: int = 2  # last-n: trailing layer groups of the tower that train (ImageTower.lock)
    num_classes: int | None = None  # object classes without background; None → dataset.json categories of data.train
    strides: list[int] = field(default_factory=lambda: [8, 16, 32])  # feature-map strides fed to the FPN
    vit_blocks: list[int] = field(default_factory=lambda: [-1])  # ViT blocks feeding the pyramid: one for every level
    # (ViTDet's simple pyramid) or one per level
    extra_level: bool = True  # a max-pooled level on top of the last stride (P6)
    fpn_channels: int = 128
    anchor_sizes: list[float] | None = (
        None  # base anchor size per level (strides + extra); None → 4 × stride (fcos: 1 ×)
    )
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])  # anchor h/w (faster_rcnn, retinanet)
    min_size: int = 800  # images are resized so the short side is min_size, the long side at most max_size
    max_size: int = 1333
    hflip: float = 0.5  # horizontal flip probability in training (boxes flipped with the image)
    box_tolerance: float = 1.0  # pixels a box may stick out of its image (clipped); further out → sample skipped
    representation_size: int = 256  # faster_rcnn: width of the two-layer box head
    roi_batch_size: int = 128  # faster_rcnn: RoIs sampled per image for the box head's loss
    roi_sampling_ratio: int = 2  # faster_rcnn: RoIAlign samples per bin side (its CPU backward dominates a step)
    rpn_proposals: list[int] = field(default_factory=lambda: [600, 100])  # faster_rcnn: proposals kept (train, eval)
    head_convs: int = 4  # fcos: conv layers per branch
    freeze_bn: bool = False  # turn the tower's BatchNorm layers into FrozenBatchNorm2d (stats and affine frozen)
    autocast: bool = False  # run the tower under bf16 autocast (CPU/GPU), the FPN and head in the model's dtype
    score_thresh: float = 0.05  # detections kept for evaluation
    detections_per_image: int = 100


# the top-level sections that belong to tasks (Task.sections): present in a run's config only for a task that reads them
OPTIONAL_SECTIONS = ("loss", "finetune", "detection")


@dataclass
class Config:
    task: str = "contrastive"  # registered task (mm_ptft.tasks); it says which optional sections below it reads
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # task sections: filled with defaults for the task that reads them, absent otherwise (mm_ptft.tasks.configure_task)
    loss: LossConfig | None = None  # contrastive
    finetune: FinetuneConfig | None = None  # classification, text-classification
    detection: DetectionConfig | None = None  # detection


# ---------------------------------------------------------------------------------------------------------------------
# Building typed configs from plain data
# ---------------------------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{origin.__name__}[{args}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (converting int → float and lists for nested types)."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"config: {key}={value!r} has the wrong type (expected {_type_name(tp)})")
    if origin is Literal:
        if value in args and not (isinstance(value, bool) and not any(isinstance(a, bool) for a in args)):
            return value
        raise ConfigError(f"config: {key}={value!r} is not one of {', '.join(repr(a) for a in args)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config: {key} must be a mapping of {tp.__name__} fields, got {value!r}")
        return _from_dict(tp, value, key)
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"config: {key}={value!r} has the wrong type (expected {_type_name(tp)})")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config: {key}={value!r} has the wrong type (expected a mapping)")
        return dict(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads '3e-4' (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config: {key}={value!r} has the wrong type (expected float)")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config: {key}={value!r} has the wrong type (expected int)")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config: {key}={value!r} has the wrong type (expected true/false)")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config: {key}={value!r} has the wrong type (expected a string)")
        return value
    raise ConfigError(f"config: {key} has an unsupported annotation {tp!r}")


def _unknown_key_error(key: str, name: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"config: unknown key '{key}'{hint}; valid keys here: {', '.join(valid)}")


def _from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in names:
            raise _unknown_key_error(key, str(name), names)
        kwargs[name] = _coerce(value, hints[name], key)
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any], cls: type = Config, prefix: str = "") -> Any:
    """Build a typed config from plain nested data, rejecting unknown keys and wrong types (keys in errors start
    with ``prefix``, e.g. ``eval.settings.coco``)."""
    cfg = _from_dict(cls, data, prefix)
    if isinstance(cfg, Config):
        validate(cfg)
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested data of a config; task sections its task does not read (None) are left out."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if v is not None or k not in OPTIONAL_SECTIONS}


# ---------------------------------------------------------------------------------------------------------------------
# YAML files, inheritance and dotted overrides
# ---------------------------------------------------------------------------------------------------------------------


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Merge ``update`` into ``base`` key by key; a mapping naming another ``model_type`` (a transformers config)
    replaces the base's mapping whole, so a BERT twin never inherits a ModernBERT recipe's fields."""
    out = dict(base)
    for k, v in update.items():
        previous = out.get(k) if isinstance(out.get(k), dict) else {}
        other_model = isinstance(v, dict) and "model_type" in v and v["model_type"] != previous.get("model_type")
        if isinstance(v, dict) and isinstance(out.get(k), dict) and not other_model:
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if not path.is_file():
        raise ConfigError(f"config: file not found: {path}")
    if path in seen:
        raise ConfigError(f"config: 'base' cycle through {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config: {path}{where} is not valid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path} must hold a mapping at the top level")
    base = data.pop("base", None)
    if base is not None:
        data = _deep_merge(_read_yaml(path.parent / base, (*seen, path)), data)
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    """``'a.b=3'`` → (['a', 'b'], 3); the value is parsed as YAML (numbers, booleans, lists, null)."""
    if "=" not in item:
        raise ConfigError(f"config: override '{item}' must look like key.sub=value")
    key, raw = item.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"config: override '{item}' has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    if _has_braces_read_as_mapping(raw, value):
        value = _split_flow_list(raw)
    return key.split("."), value


def _has_braces_read_as_mapping(raw: str, value: Any) -> bool:
    """``[a photo of a {}., a {} in the dark]`` is a YAML flow list whose ``{}`` YAML reads as empty mappings (or
    fails to parse): the user meant templates, where ``{}`` marks the class name."""
    text = raw.strip()
    if not (text.startswith("[") and text.endswith("]") and "{}" in text):
        return False
    return not isinstance(value, list) or any(not isinstance(v, str) for v in value)


def _split_flow_list(raw: str) -> list[str]:
    """The items of ``[a, b, c]`` as plain strings (commas separate items; quotes around an item are dropped)."""
    items = [item.strip() for item in raw.strip()[1:-1].split(",")]
    return [
        item[1:-1] if len(item) >= 2 and item[0] == item[-1] and item[0] in "'\"" else item for item in items if item
    ]


def apply_overrides(data: dict[str, Any], overrides: list[str], cls: type = Config) -> dict[str, Any]:
    """Apply dotted overrides to plain config data, checking each key path against the dataclass schema."""
    data = _deep_merge({}, data)
    for item in overrides:
        parts, value = parse_override(item)
        node, tp = data, cls
        for i, part in enumerate(parts):
            key = ".".join(parts[: i + 1])
            if tp is not None and dataclasses.is_dataclass(tp):
                names = [f.name for f in dataclasses.fields(tp)]
                if part not in names:
                    raise _unknown_key_error(key, part, names)
                tp = _dataclass_in(typing.get_type_hints(tp)[part])
            else:
                tp = None  # inside a free-form dict (e.g. model.image.kwargs): any key is allowed
            if i == len(parts) - 1:
                node[part] = value
            else:
                child = node.get(part)
                if not isinstance(child, dict):
                    child = {}
                    node[part] = child
                node = child
    return data


def _dataclass_in(tp: Any) -> Any:
    """The dataclass inside an annotation (``X`` or ``X | None``), or None for a plain value / free-form dict."""
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, cls: type = Config) -> Any:
    """Load a YAML config (with ``base:`` inheritance), apply dotted overrides, and validate it.

    Args:
        path: YAML file; None starts from the dataclass defaults.
        overrides: ``key.sub=value`` strings applied after the file.
        cls: the root dataclass.

    Raises:
        ConfigError: a missing file, bad YAML, unknown key, wrong type or inconsistent values.
    """
    data = _read_yaml(Path(path)) if path is not None else {}
    data = apply_overrides(data, list(overrides or []), cls)
    cfg = config_from_dict(data, cls)
    if isinstance(cfg, Config) and cfg.train.name is None and path is not None:
        cfg.train.name = Path(path).stem
    return cfg


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def validate(cfg: Config) -> None:
    """Checks across fields that types alone cannot express."""
    checks = [
        (cfg.data.batch_size > 0, "data.batch_size must be > 0"),
        (cfg.data.workers >= 0, "data.workers must be >= 0"),
        (cfg.data.shuffle_group >= 1, "data.shuffle_group must be >= 1"),
        (cfg.data.train != [], "data.train is an empty list (give one source or several weighted ones)"),
        (
            not isinstance(cfg.data.train, list) or all(0 < s.weight < math.inf for s in cfg.data.train),
            "data.train: every source's weight must be > 0 and finite",
        ),
        (cfg.data.remote.timeout_s > 0, "data.remote.timeout_s must be > 0"),
        (cfg.data.remote.retries >= 0, "data.remote.retries must be >= 0"),
        (cfg.data.remote.backoff_s >= 0, "data.remote.backoff_s must be >= 0"),
        (0.0 <= cfg.data.max_bad_fraction <= 1.0, "data.max_bad_fraction must be in [0, 1]"),
        (cfg.deepspeed.grad_accum_steps >= 1, "deepspeed.grad_accum_steps must be >= 1"),
        (cfg.optim.lr > 0, "optim.lr must be > 0"),
        (cfg.optim.warmup_steps >= 0, "optim.warmup_steps must be >= 0"),
        (len(cfg.optim.betas) == 2, "optim.betas must have two values"),
        (0.0 <= cfg.optim.momentum < 1.0, "optim.momentum must be in [0, 1)"),
        (
            cfg.optim.name != "sgd" or not cfg.optim.nesterov or cfg.optim.momentum > 0,
            "optim.nesterov needs optim.momentum > 0",
        ),
        (cfg.train.steps is None or cfg.train.steps > 0, "train.steps must be > 0"),
        (cfg.train.epochs > 0, "train.epochs must be > 0"),
        (cfg.model.embed_dim > 0, "model.embed_dim must be > 0"),
        (cfg.model.text.context_length > 0, "model.text.context_length must be > 0"),
        (cfg.model.image.in_chans in (1, 3), "model.image.in_chans must be 1 or 3"),
        (0.0 <= cfg.model.image.patch_dropout < 1.0, "model.image.patch_dropout must be in [0, 1)"),
        (
            math.isfinite(cfg.model.logit_scale_init) and cfg.model.logit_scale_init > 0,
            "model.logit_scale_init must be a positive number",
        ),
        (len(cfg.data.image.train_scale) == 2, "data.image.train_scale must be [min, max]"),
        (0.0 <= cfg.data.image.hflip <= 1.0, "data.image.hflip must be in [0, 1]"),
        (0.0 <= cfg.data.image.re_prob <= 1.0, "data.image.re_prob must be in [0, 1]"),
        (cfg.train.keep_last >= 1, "train.keep_last must be >= 1"),
        (cfg.train.ema_decay is None or 0.0 < cfg.train.ema_decay < 1.0, "train.ema_decay must be in (0, 1) or null"),
        (
            cfg.train.ema_decay is None or cfg.deepspeed.zero_stage < 3,
            "train.ema_decay needs deepspeed.zero_stage <= 2 (ZeRO-3 partitions the weights it averages)",
        ),
        (
            cfg.train.early_stop_patience == 0 or cfg.eval.select_metric is not None,
            "train.early_stop_patience needs eval.select_metric",
        ),
    ]
    for mean_std in ("mean", "std"):
        value = getattr(cfg.data.image, mean_std)
        checks.append(
            (
                value is None or len(value) == cfg.model.image.in_chans,
                f"data.image.{mean_std} needs {cfg.model.image.in_chans} values (model.image.in_chans)",
            )
        )
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"config: {message}")
