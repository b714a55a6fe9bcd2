"""Single-device model code: towers, heads, the dual encoder, classifiers and detectors over a tower, RoIAlign and
the zero-shot classifier builder (no deepspeed / torch.distributed here: a design-rule test enforces it)."""

from mm_ptft.models.classifier import ImageClassifier, TextClassifier, TowerClassifier
from mm_ptft.models.dual_encoder import DualEncoder, create_model, use_fused_attn
from mm_ptft.models.image_tower import ImageTower
from mm_ptft.models.text_tower import TextTower, Tokenize, create_tokenizer, tokenize

__all__ = [
    "DualEncoder",
    "ImageClassifier",
    "ImageTower",
    "TextClassifier",
    "TextTower",
    "Tokenize",
    "TowerClassifier",
    "create_model",
    "create_tokenizer",
    "tokenize",
    "use_fused_attn",
]
