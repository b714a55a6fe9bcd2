"""Image tower → ONNX (``model.onnx``, dynamic batch), checked with onnxruntime.

Input ``image``: (B, C, H, W) float32, already normalised (``config.json`` beside the model gives size, mean, std).
Outputs ``features``: (B, width) pooled trunk features; ``embedding``: (B, embed_dim) L2-normalised joint embedding
(what ``encode_image`` returns).
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mm_ptft.export.source import ExportError, ExportSource, check_close
from mm_ptft.export.target import ExportTarget, register_target

CHECK_BATCHES = (1, 7)  # a batch of one is the classic place where an exporter bakes in a shape


class _ImageEncoder(nn.Module):
    def __init__(self, tower: nn.Module):
        super().__init__()
        self.tower = tower

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.tower.forward_pooled(image)  # (B, width)
        return features, F.normalize(self.tower.proj(features), dim=-1)  # (B, embed_dim)


def export_onnx(src: ExportSource, out: Path, verify: bool = True, opset: int | None = None) -> dict:
    """Write ``model.onnx`` + ``config.json`` under ``out``; returns what was written and checked.

    Raises:
        ExportError: the checkpoint has no image tower, the exporter fails, or onnxruntime's outputs differ.
    """
    tower = src.image_tower("onnx")
    module = _ImageEncoder(tower).eval()
    out.mkdir(parents=True, exist_ok=True)
    example = src.example_images(batch=2)
    batch = torch.export.Dim("batch", min=1)
    kwargs = {"opset_version": opset} if opset is not None else {}
    # the exporter narrates every stage on stdout and warns about internals: keep only its errors
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                (example,),
                input_names=["image"],
                output_names=["features", "embedding"],
                dynamic_shapes=({0: batch},),
                dynamo=True,
                verbose=False,
                **kwargs,
            )
            program.save(str(out / "model.onnx"))
    except Exception as e:  # noqa: BLE001 - torch.export / onnxscript raise many types; all mean "not exportable"
        raise ExportError(f"export: ONNX export of the image tower failed: {str(e).strip().splitlines()[0]}") from None
    mean, std = src.norm_stats
    image = src.cfg.model.image
    config = {
        "input": {"name": "image", "shape": ["batch", image.in_chans, image.image_size, image.image_size]},
        "outputs": {"features": ["batch", tower.width], "embedding": ["batch", src.cfg.model.embed_dim]},
        "mean": list(mean),
        "std": list(std),
        "interpolation": src.cfg.data.image.interpolation,
        "resize": "short side to size, then centre crop",
        "source": str(src.path),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    info: dict = {"files": ["model.onnx", "config.json"]}
    if verify:
        info["max_abs_diff"] = verify_onnx(src, out / "model.onnx")
    return info


def verify_onnx(src: ExportSource, path: Path, batches: tuple[int, ...] = CHECK_BATCHES) -> dict[str, float]:
    """onnxruntime vs the tower, for each batch size: the largest difference of each output."""
    import onnxruntime as ort

    tower = src.image_tower("onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    diffs = {}
    for b in batches:
        x = src.example_images(batch=b, seed=b)
        features, embedding = session.run(["features", "embedding"], {"image": x.numpy()})
        with torch.no_grad():
            pooled = tower.forward_pooled(x)
            diffs[f"features_b{b}"] = check_close(f"ONNX features (batch {b})", pooled, torch.from_numpy(features))
            ours = F.normalize(tower.proj(pooled), dim=-1)
            diffs[f"embedding_b{b}"] = check_close(f"ONNX embedding (batch {b})", ours, torch.from_numpy(embedding))
    return diffs


@register_target
class OnnxTarget(ExportTarget):
    """The image tower (features and embedding) as ONNX with a dynamic batch."""

    name = "onnx"

    def export(self, src: ExportSource, work: Path, final: Path, verify: bool, opset: int | None) -> dict:
        return export_onnx(src, work, verify, opset)


__all__ = ["ExportError", "OnnxTarget", "export_onnx", "verify_onnx"]
