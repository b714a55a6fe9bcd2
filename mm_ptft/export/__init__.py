"""Export trained models to the formats other libraries load: timm (image tower), transformers (text tower),
open_clip (whole model), ONNX (image tower); and CLIP_benchmark evaluation of any mm-ptft model.

Every export reloads what it wrote with the target library and compares it with the mm-ptft model's own outputs
(see ``docs/export.md``). Heavy libraries (onnx, onnxruntime, open_clip, clip_benchmark) are imported by the target
that needs them.
"""

from mm_ptft.export.core import TARGETS, export_model
from mm_ptft.export.source import ExportError, ExportSource, load_source

__all__ = ["TARGETS", "ExportError", "ExportSource", "export_model", "load_source"]
