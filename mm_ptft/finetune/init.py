"""Where a fine-tuned model starts: a tower's weights from a pretraining (or fine-tuning) checkpoint, and the
zero-shot head built from the pretraining dual encoder's text tower.
"""

from __future__ import annotations

import torch

from mm_ptft import checkpoint as ckpt
from mm_ptft.config import Config, ConfigError
from mm_ptft.data.classes import check_templates
from mm_ptft.models import ImageTower, TextTower


def head_input_of(cfg: Config) -> str:
    """``finetune.head_input``, else the embedding with a zero-shot head and the pooled features otherwise."""
    return cfg.finetune.head_input or ("embedding" if cfg.finetune.head_init == "zeroshot" else "pooled")


def tower_state(state: dict[str, torch.Tensor], prefix: str, source: str) -> dict[str, torch.Tensor]:
    """The ``prefix``-ed weights of a model state (``image.`` / ``text.``), names relative to the tower."""
    sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not sub:
        raise ckpt.CheckpointError(
            f"checkpoint: {source} holds no '{prefix}*' weights (keys start with: "
            f"{', '.join(sorted({k.split('.')[0] for k in state})[:5])})"
        )
    return sub


def load_tower(tower: ImageTower | TextTower, source: str, prefix: str) -> None:
    """Load a tower from a pretraining or fine-tuning checkpoint (any ZeRO stage, consolidated to fp32).

    Raises:
        CheckpointError: the source is missing, holds no ``prefix`` weights, or weights of another shape.
    """
    state = tower_state(ckpt.load_weights(source), prefix, source)
    for name, value in tower.state_dict().items():
        # CNN stages a last-n / linear-probe run locked became FrozenBatchNorm2d, which keeps no batch counter;
        # the counter only matters for BatchNorm with momentum=None, so the fresh tower's own value stands in
        if name.endswith(".num_batches_tracked") and name not in state:
            state[name] = value
    ckpt.load_model_weights(tower, state, what=f"{source} ('{prefix}*' weights)")


def zeroshot_head(cfg: Config, classnames: list[str] | None, templates: list[str] | None):
    """(image tower, class embeddings (D, C), logit scale) of the dual encoder saved at ``finetune.init``."""
    from mm_ptft.models import Tokenize
    from mm_ptft.models.dual_encoder import DualEncoder
    from mm_ptft.models.zeroshot import zeroshot_classifier

    if not classnames or not templates:
        raise ConfigError("config: finetune.head_init=zeroshot needs class names and templates (eval.templates)")
    check_templates(templates, "eval.templates")
    source = cfg.finetune.init
    state = ckpt.load_weights(source)
    tower_state(state, "text.", f"{source} (finetune.head_init=zeroshot needs the pretraining dual encoder)")
    dual = DualEncoder(cfg.model)
    ckpt.load_model_weights(dual, state, what=str(source))
    dual.eval()
    classifier = zeroshot_classifier(dual, Tokenize.create(cfg.model.text), classnames, templates, torch.device("cpu"))
    return dual.image, classifier, dual.get_logit_scale().item()
