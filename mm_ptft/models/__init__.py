"""Single-device model code: towers, heads and the dual encoder (no deepspeed / torch.distributed here)."""

from mm_ptft.models.dual_encoder import DualEncoder, create_model, use_fused_attn
from mm_ptft.models.image_tower import ImageTower
from mm_ptft.models.text_tower import TextTower, create_tokenizer, tokenize

__all__ = ["DualEncoder", "ImageTower", "TextTower", "create_model", "create_tokenizer", "tokenize", "use_fused_attn"]
