"""Image tower → a timm checkpoint directory: ``model.safetensors`` (the trunk, no classifier) + ``config.json``.

``config.json`` has the layout timm writes for the Hub (``architecture``, ``model_args``, ``pretrained_cfg`` with input
size, interpolation, crop and mean/std), so both of these load the backbone::

    timm.create_model("local-dir:OUT/timm", pretrained=True)                     # num_classes=0: features
    timm.create_model(arch, pretrained=True, num_classes=10, **model_args,
                      pretrained_cfg_overlay=dict(pretrained_cfg, file="OUT/timm/model.safetensors"))

The projection into the joint embedding is saved beside it (``projection.safetensors``, keys of
:func:`mm_ptft.models.heads.build_projection`).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch

from mm_ptft.checkpoint import save_weights
from mm_ptft.export.source import ExportError, ExportSource, check_close
from mm_ptft.export.target import ExportTarget, register_target

# training-time regularisers: timm's exported model_args leave them out too, a fine-tuner sets its own
DROP_KWARGS = (
    "drop_rate",
    "drop_path_rate",
    "drop_block_rate",
    "attn_drop_rate",
    "proj_drop_rate",
    "pos_drop_rate",
    "patch_drop_rate",
)


def takes_img_size(trunk: torch.nn.Module) -> bool:
    """Whether timm built this trunk with an ``img_size`` argument (ViT-like); mm-ptft passes it when accepted."""
    return "img_size" in inspect.signature(type(trunk).__init__).parameters


def model_args(src: ExportSource) -> dict:
    """The timm.create_model arguments that rebuild the trunk's architecture (no num_classes: the caller's choice)."""
    image = src.cfg.model.image
    args = {k: v for k, v in image.kwargs.items() if k not in DROP_KWARGS}
    args["in_chans"] = image.in_chans
    if image.pool is not None:
        args["global_pool"] = image.pool
    if "img_size" not in args and takes_img_size(src.image_tower("timm").trunk):
        args["img_size"] = image.image_size
    return args


def timm_config(src: ExportSource) -> dict:
    """``config.json`` for the exported trunk, in timm's Hub layout."""
    import timm

    image = src.cfg.model.image
    tower = src.image_tower("timm")
    default = timm.get_pretrained_cfg(image.name)
    default = default.to_dict() if default is not None else {}
    mean, std = src.norm_stats
    pretrained_cfg = {
        "input_size": [image.in_chans, image.image_size, image.image_size],
        "fixed_input_size": bool(default.get("fixed_input_size", False)),
        # mm-ptft's evaluation transform: resize the short side to image_size, centre-crop (crop_pct 1)
        "interpolation": src.cfg.data.image.interpolation,
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": list(mean),
        "std": list(std),
        "num_classes": 0,
        "custom_load": False,  # a native timm state dict (the architecture's default weights may need a custom loader)
    }
    for key in ("first_conv", "classifier"):
        if default.get(key):
            pretrained_cfg[key] = default[key]
    pool = getattr(tower.trunk, "global_pool", None)
    pool = getattr(pool, "pool_type", pool)
    config = {
        "architecture": image.name,
        "num_classes": 0,
        "num_features": tower.width,
        "model_args": model_args(src),
        "pretrained_cfg": pretrained_cfg,
        "mm_ptft": {
            "source": str(src.path),
            "task": src.cfg.task,
            "embed_dim": src.cfg.model.embed_dim,
            "proj": image.proj,
            "proj_bias": image.proj_bias,
        },
    }
    if isinstance(pool, str) and pool:
        config["global_pool"] = pool
    return config


def load_exported(out: Path, **kwargs) -> torch.nn.Module:
    """The exported backbone through plain timm (the documented overlay form), in eval mode."""
    import timm

    config = json.loads((out / "config.json").read_text())
    args = {**config["model_args"], "num_classes": 0, **kwargs}
    overlay = dict(config["pretrained_cfg"], file=str(out / "model.safetensors"))
    return timm.create_model(config["architecture"], pretrained=True, pretrained_cfg_overlay=overlay, **args).eval()


def export_timm(src: ExportSource, out: Path, verify: bool = True) -> dict:
    """Write the image tower's trunk as a timm checkpoint under ``out``; returns what was written and checked.

    Raises:
        ExportError: the checkpoint has no image tower, or the reloaded backbone does not reproduce the tower.
    """
    tower = src.image_tower("timm")
    out.mkdir(parents=True, exist_ok=True)
    save_weights(tower.trunk.state_dict(), out / "model.safetensors", {"format": "pt"})
    files = ["model.safetensors", "config.json"]
    if any(True for _ in tower.proj.parameters()):
        save_weights(tower.proj.state_dict(), out / "projection.safetensors", {"format": "pt"})
        files.append("projection.safetensors")
    config = timm_config(src)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    info = {"files": files, "architecture": config["architecture"], "model_args": config["model_args"]}
    if verify:
        x = src.example_images()
        try:
            model = load_exported(out)
        except (RuntimeError, TypeError, ValueError) as e:
            raise ExportError(f"export: timm cannot load the exported backbone: {str(e).splitlines()[0]}") from None
        with torch.no_grad():
            info["max_abs_diff"] = check_close("timm features", tower.forward_pooled(x), model(x))
    return info


@register_target
class TimmTarget(ExportTarget):
    """The image tower's trunk as a timm checkpoint directory."""

    name = "timm"

    def export(self, src: ExportSource, work: Path, final: Path, verify: bool, opset: int | None) -> dict:
        return export_timm(src, work, verify)
