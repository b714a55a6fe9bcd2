"""Export trained models to the formats other libraries load: timm (image tower), transformers (text tower),
open_clip (whole model), ONNX (image tower); and CLIP_benchmark evaluation of any mm-ptft model.

Each format is an :class:`ExportTarget` registered in ``TARGETS`` (:mod:`.target`) that says whether it can export a
model and why not. Every export reloads what it wrote with the target library and compares it with the mm-ptft
model's own outputs (see ``docs/export.md``). Heavy libraries (onnx, onnxruntime, open_clip, clip_benchmark) are
imported by the target that needs them.
"""

from mm_ptft.export.core import check_targets, export_model, summary_text
from mm_ptft.export.source import ExportError, ExportSource, load_source
from mm_ptft.export.target import TARGETS, ExportTarget, register_target

__all__ = [
    "TARGETS",
    "ExportError",
    "ExportSource",
    "ExportTarget",
    "check_targets",
    "export_model",
    "load_source",
    "register_target",
    "summary_text",
]
