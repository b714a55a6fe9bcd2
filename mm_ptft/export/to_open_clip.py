"""Whole model → an open_clip directory that ``open_clip.create_model_and_transforms("local-dir:DIR")`` loads.

The directory holds ``open_clip_config.json`` (model and preprocessing config), ``open_clip_model.safetensors``, and
the text tower's transformers config + tokenizer files (open_clip's HF text tower and HF tokenizer read them).

open_clip (3.3) builds the image tower as ``TimmModel``: ``timm.create_model(name)`` with no other arguments, then
its own pooling and projection head; and the text tower as ``HFTextEncoder``: ``AutoConfig.from_pretrained(
hf_model_name)`` with a pooler and a projection of its own. Only mm-ptft models whose towers those two wrappers
rebuild exactly can be exported; :func:`unsupported_reasons` says why another cannot, and the export is then refused.

``hf_model_name`` must name a local directory for open_clip to work offline, and open_clip resolves it against the
working directory, not against the export: it is written as the absolute path where the export was published.
Moving or copying the directory therefore needs that path re-pointed — :func:`relocate` does it (rewrites
``text_cfg.hf_model_name`` / ``hf_tokenizer_name`` to the directory's current absolute path), or pass
``text_cfg=`` to open_clip as :func:`load_exported` does. Everything else (weights, tokenizer, HF config) is found
inside the directory. tests/export/test_export.py moves an export and checks both ways.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from mm_ptft.checkpoint import save_weights
from mm_ptft.export.source import EXAMPLE_TEXTS, ExportError, ExportSource, check_close
from mm_ptft.export.target import ExportTarget, register_target
from mm_ptft.export.to_timm import DROP_KWARGS, takes_img_size
from mm_ptft.export.to_transformers import quiet_transformers

WEIGHTS = "open_clip_model.safetensors"
# mm-ptft text pooling → open_clip HF pooler (open_clip's 'cls_pooler' would use BERT's pooler layer instead)
TEXT_POOLERS = {"cls": "cls_last_hidden_state_pooler", "mean": "mean_pooler"}


def _default_image_size(name: str) -> int | None:
    import timm

    pretrained_cfg = timm.get_pretrained_cfg(name)
    size = getattr(pretrained_cfg, "input_size", None)
    return int(size[-1]) if size else None


def unsupported_reasons(src: ExportSource) -> list[str]:
    """Why open_clip cannot represent this model (empty when it can, as far as configs tell; the export then also
    checks outputs). Each reason is one clause naming the setting."""
    if not src.has_dual_encoder:
        held = "only the image tower" if src.has_image else "only the text tower" if src.has_text else "no towers"
        return [f"an open_clip model needs both towers, the checkpoint holds {held} (task '{src.cfg.task}')"]
    from open_clip.hf_configs import arch_dict

    model = src.cfg.model
    image, text = model.image, model.text
    reasons = []
    if image.in_chans != 3:
        reasons.append(f"model.image.in_chans={image.in_chans}: open_clip's timm tower and preprocessing are RGB only")
    arch_kwargs = sorted(k for k in image.kwargs if k not in DROP_KWARGS)
    if arch_kwargs:
        reasons.append(
            f"model.image.kwargs sets {', '.join(arch_kwargs)}: open_clip 3.3's timm wrapper calls "
            f"timm.create_model('{image.name}') with no architecture arguments"
        )
    default_size = _default_image_size(image.name)
    trunk = src.image_tower("open_clip").trunk
    if takes_img_size(trunk) and default_size is not None and image.image_size != default_size:
        reasons.append(
            f"model.image.image_size={image.image_size} differs from {image.name}'s default {default_size}: "
            "open_clip 3.3's timm wrapper cannot set img_size"
        )
    if image.pool in ("abs_attn", "rot_attn"):
        reasons.append(f"model.image.pool='{image.pool}' is open_clip's own attention pool, not timm's")
    elif image.pool is not None and not isinstance(getattr(trunk, "fc_norm", None), (type(None), torch.nn.Identity)):
        reasons.append(
            f"model.image.pool='{image.pool}' gives {image.name} a norm after pooling (fc_norm): open_clip 3.3 builds "
            "the trunk with its default pooling and only resets the pool type, so that norm has no place"
        )
    if src.cfg.data.image.interpolation not in ("bicubic", "bilinear"):
        reasons.append(
            f"data.image.interpolation='{src.cfg.data.image.interpolation}': open_clip resizes bicubic or bilinear"
        )
    if text.trust_remote_code:
        reasons.append("model.text.trust_remote_code: open_clip's HF text tower loads no remote code")
    model_type = src.text_tower("open_clip").transformer.config.model_type
    if model_type not in arch_dict:
        reasons.append(f"text model_type '{model_type}': open_clip's HF text tower knows only {', '.join(arch_dict)}")
    if text.pool not in TEXT_POOLERS:
        reasons.append(f"model.text.pool='{text.pool}': open_clip's HF poolers are cls / mean / max, no 'last'")
    if text.proj == "mlp":
        reasons.append(
            "model.text.proj='mlp': open_clip's HF 'mlp' head is (width+embed)//2 wide, no biases; mm-ptft's is 2×embed"
        )
    if text.proj == "linear" and text.proj_bias:
        reasons.append("model.text.proj_bias: open_clip's HF linear head has no bias")
    return reasons


def _vision_cfg(src: ExportSource) -> dict:
    image = src.cfg.model.image
    tower = src.image_tower("open_clip")
    if image.pool is not None:
        pool = image.pool
    elif image.proj == "none":
        # open_clip then asks timm for the pooled features itself, so it needs the trunk's pool type by name
        pool = getattr(tower.trunk, "global_pool", "")
        pool = getattr(pool, "pool_type", pool)
    else:
        pool = ""  # keep timm's default pooling, as mm-ptft does
    return {
        "timm_model_name": image.name,
        "timm_model_pretrained": False,
        "timm_pool": pool,
        "timm_proj": image.proj,
        "timm_proj_bias": image.proj_bias,
        "timm_drop": 0.0,
        "timm_drop_path": image.kwargs.get("drop_path_rate"),
        "image_size": image.image_size,
    }


def open_clip_config(src: ExportSource, final_dir: Path) -> dict:
    """``open_clip_config.json`` content; ``final_dir`` is where the directory will live (the HF text path)."""
    model, text = src.cfg.model, src.cfg.model.text
    mean, std = src.norm_stats
    model_cfg = {
        "embed_dim": model.embed_dim,
        "custom_text": True,
        "nonscalar_logit_scale": True,  # mm-ptft keeps logit_scale / logit_bias as shape (1,)
        "init_logit_scale": math.log(model.logit_scale_init),
        "vision_cfg": _vision_cfg(src),
        "text_cfg": {
            "hf_model_name": str(final_dir),
            "hf_tokenizer_name": str(final_dir),
            "hf_model_pretrained": False,
            "hf_proj_type": "linear" if text.proj == "linear" else None,
            "hf_pooler_type": TEXT_POOLERS[text.pool],
            "context_length": text.context_length,
            "vocab_size": src.text_tower("open_clip").transformer.config.vocab_size,
        },
    }
    if model.logit_bias_init is not None:
        model_cfg["init_logit_bias"] = model.logit_bias_init
    preprocess_cfg = {
        "size": model.image.image_size,
        "mode": "RGB",
        "mean": list(mean),
        "std": list(std),
        "interpolation": src.cfg.data.image.interpolation,
        "resize_mode": "shortest",  # mm-ptft's evaluation transform: resize the short side, centre-crop
    }
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}


def open_clip_state(src: ExportSource) -> dict[str, torch.Tensor]:
    """The dual encoder's weights under open_clip's CustomTextCLIP names."""
    model = src.dual_encoder("open_clip")
    image_proj = {
        "linear": {"weight": "proj.weight", "bias": "proj.bias"},
        "mlp": {
            "0.weight": "mlp.fc1.weight",
            "0.bias": "mlp.fc1.bias",
            "2.weight": "mlp.fc2.weight",
            "2.bias": "mlp.fc2.bias",
        },
        "none": {},
    }[src.cfg.model.image.proj]
    state = {f"visual.trunk.{k}": v for k, v in model.image.trunk.state_dict().items()}
    state.update({f"visual.head.{image_proj[k]}": v for k, v in model.image.proj.state_dict().items()})
    state.update({f"text.transformer.{k}": v for k, v in model.text.transformer.state_dict().items()})
    state.update({f"text.proj.{k}": v for k, v in model.text.proj.state_dict().items()})
    state["logit_scale"] = model.logit_scale.detach()
    if model.logit_bias is not None:
        state["logit_bias"] = model.logit_bias.detach()
    return state


def export_open_clip(src: ExportSource, out: Path, final_dir: Path, verify: bool = True) -> dict:
    """Write an open_clip directory under ``out`` (to be moved to ``final_dir``); returns what was written and checked.

    Raises:
        ExportError: open_clip cannot represent the model (the message says why), or the model open_clip builds
            from the directory does not reproduce ``encode_image`` / ``encode_text``.
    """
    reasons = unsupported_reasons(src)
    if reasons:
        raise ExportError(f"export: open_clip cannot represent this model: {'; '.join(reasons)}")
    model = src.dual_encoder("open_clip")
    tokenizer = src.tokenizer()
    out.mkdir(parents=True, exist_ok=True)
    # open_clip's HF text tower reads this config; its mask is `input_ids != pad_token_id`, so the two must agree
    hf_config = model.text.transformer.config.to_dict()
    if tokenizer.pad_token_id is not None:
        hf_config["pad_token_id"] = tokenizer.pad_token_id
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    tokenizer.save_pretrained(out)
    config = open_clip_config(src, final_dir)
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_weights(open_clip_state(src), out / WEIGHTS, {"format": "pt"})
    info: dict = {"files": sorted(p.name for p in out.iterdir()), "hf_model_name": str(final_dir)}
    if verify:
        info.update(_verify(src, out))
    return info


def relocate(directory: str | Path) -> Path:
    """Point a moved or copied open_clip export's text paths at where it now is; returns the config file.

    Raises:
        ExportError: ``directory`` holds no ``open_clip_config.json``.
    """
    directory = Path(directory).expanduser().absolute()
    path = directory / "open_clip_config.json"
    if not path.is_file():
        raise ExportError(f"export: {directory} is not an open_clip export (no open_clip_config.json)")
    config = json.loads(path.read_text())
    text_cfg = config["model_cfg"]["text_cfg"]
    text_cfg["hf_model_name"] = text_cfg["hf_tokenizer_name"] = str(directory)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    tmp.replace(path)
    return path


def load_exported(directory: Path, hf_dir: Path | None = None):
    """(model, val preprocess, tokenizer) through open_clip, wherever the directory now is: the text tower is read
    from ``hf_dir`` (default: ``directory`` itself), not from the path recorded at export time."""
    import open_clip

    hf_dir = Path(hf_dir if hf_dir is not None else directory).absolute()
    text_cfg = json.loads((directory / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]
    kwargs = {"text_cfg": dict(text_cfg, hf_model_name=str(hf_dir), hf_tokenizer_name=str(hf_dir))}
    with quiet_transformers():
        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{directory}", **kwargs)
        tokenizer = open_clip.get_tokenizer(f"local-dir:{directory}")
    return model.eval(), preprocess, tokenizer


def _verify(src: ExportSource, out: Path) -> dict:
    model = src.dual_encoder("open_clip")
    try:
        oc_model, _, oc_tokenizer = load_exported(out, hf_dir=out)
    except (RuntimeError, ValueError, OSError, TypeError, KeyError) as e:
        # e.g. a ViT pooled by 'avg' has fc_norm where timm's default (the tower open_clip builds) has norm
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(
            f"export: open_clip cannot represent this model: the model it builds does not take its weights ({detail})"
        ) from None
    x = src.example_images()
    ours = src.tokenize(EXAMPLE_TEXTS)
    ids = oc_tokenizer(EXAMPLE_TEXTS)
    if not torch.equal(ids, ours["input_ids"]):
        raise ExportError("export: open_clip's tokenizer tokenizes differently from the model's tokenizer")
    with torch.no_grad():
        return {
            "max_abs_diff_image": check_close(
                "open_clip encode_image", model.encode_image(x), oc_model.encode_image(x, normalize=True)
            ),
            "max_abs_diff_text": check_close(
                "open_clip encode_text", model.encode_text(**ours), oc_model.encode_text(ids, normalize=True)
            ),
        }


@register_target
class OpenClipTarget(ExportTarget):
    """The whole dual encoder as an open_clip ``local-dir:`` directory."""

    name = "open_clip"

    def unavailable(self, src: ExportSource) -> str | None:
        reasons = unsupported_reasons(src)
        return "; ".join(reasons) if reasons else None

    def export(self, src: ExportSource, work: Path, final: Path, verify: bool, opset: int | None) -> dict:
        return export_open_clip(src, work, final, verify)
