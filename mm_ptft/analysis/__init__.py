"""What fine-tuning changed: per-layer relative weight change and linear CKA between a pretrained and a fine-tuned
tower (``mm-ptft diff``)."""

from mm_ptft.analysis.cka import linear_cka
from mm_ptft.analysis.drift import relative_change

__all__ = ["linear_cka", "relative_change"]
