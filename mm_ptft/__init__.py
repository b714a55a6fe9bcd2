"""mm-ptft: multimodal contrastive pretraining and per-tower fine-tuning.

Importing the package has no side effects: processes, argv and process groups belong to ``mm_ptft.cli`` and
``launch/``. Heavy optional pieces (deepspeed, detection, ONNX, plotting) are imported where they are used.
"""

__version__ = "0.1.0"
