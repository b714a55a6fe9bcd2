import math

import pytest
import torch
from helpers import tiny_cfg

from mm_ptft.config import ConfigError, OptimConfig, load_config
from mm_ptft.models import create_model
from mm_ptft.train.optim import create_optimizer, lr_lambda, param_groups


def test_no_weight_decay_on_norms_biases_tokens_and_scale():
    model = create_model(tiny_cfg().model)
    groups = param_groups(model, OptimConfig(weight_decay=0.1))
    by_name = {n: g for g in groups for n in g["param_names"]}
    for name in (
        "logit_scale",
        "image.trunk.norm.weight",
        "image.trunk.blocks.0.attn.qkv.bias",
        "image.trunk.cls_token",
        "image.trunk.pos_embed",
        "text.transformer.embeddings.LayerNorm.weight",
    ):
        assert by_name[name]["weight_decay"] == 0.0, name
    for name in (
        "image.trunk.blocks.0.attn.qkv.weight",
        "text.transformer.encoder.layer.0.attention.self.query.weight",
        "image.proj.weight",
        "text.proj.weight",
    ):
        assert by_name[name]["weight_decay"] == 0.1, name
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)


def test_per_tower_lr_and_frozen_params_excluded():
    cfg = tiny_cfg("model.image.lock=true")
    model = create_model(cfg.model)
    groups = param_groups(model, OptimConfig(lr=1e-3, image_lr_scale=0.1, text_lr_scale=2.0))
    lrs = {n: g["lr"] for g in groups for n in g["param_names"]}
    assert lrs["image.proj.weight"] == pytest.approx(1e-4)
    assert lrs["text.proj.weight"] == pytest.approx(2e-3)
    assert lrs["logit_scale"] == pytest.approx(1e-3)
    assert not any(n.startswith("image.trunk.") for n in lrs)


def test_layer_decay_scales_lr_by_depth():
    model = create_model(tiny_cfg().model)
    groups = param_groups(model, OptimConfig(lr=1.0, layer_decay=0.5))
    lrs = {n: g["lr"] for g in groups for n in g["param_names"]}
    n = len(model.image.layer_groups())
    assert lrs["image.proj.weight"] == pytest.approx(1.0)
    assert lrs["image.trunk.patch_embed.proj.weight"] == pytest.approx(0.5 ** (n - 1))
    assert lrs["image.trunk.blocks.1.mlp.fc1.weight"] > lrs["image.trunk.blocks.0.mlp.fc1.weight"]


def test_schedule_warmup_then_cosine_to_floor():
    cfg = OptimConfig(warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    fn = lr_lambda(cfg, 110)
    assert fn(0) == pytest.approx(1 / 11) and fn(9) == pytest.approx(10 / 11)
    assert fn(10) == pytest.approx(1.0)
    assert fn(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert fn(110) == pytest.approx(0.1)
    assert lr_lambda(OptimConfig(warmup_steps=0, schedule="constant"), 5)(3) == 1.0
    assert lr_lambda(OptimConfig(warmup_steps=0, schedule="linear"), 10)(5) == pytest.approx(0.5)


def test_optimizer_is_torch_adamw_or_sgd_with_config():
    overrides = [
        "model.text.config={model_type: bert, hidden_size: 8, num_hidden_layers: 1, "
        "num_attention_heads: 1, intermediate_size: 8}",
        "model.text.tokenizer=minilm-l6",
        "model.image.name=resnet18",
        "model.image.image_size=32",
        "optim.betas=[0.8, 0.9]",
    ]
    cfg = load_config(None, overrides)
    model = create_model(cfg.model)
    opt = create_optimizer(model, cfg.optim)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.8, 0.9)
    cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay = "sgd", 0.1, 1e-4
    sgd = create_optimizer(model, cfg.optim)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.9 and sgd.defaults["nesterov"]
    # the same groups as AdamW: no decay on norms / biases, per-group lr
    assert [(g["name"], g["weight_decay"]) for g in sgd.param_groups] == [
        (g["name"], 1e-4 if g["weight_decay"] else 0.0) for g in opt.param_groups
    ]
    with pytest.raises(ConfigError, match="optim.nesterov needs optim.momentum > 0"):
        load_config(None, [*overrides, "optim.name=sgd", "optim.momentum=0"])
