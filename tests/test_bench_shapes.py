"""bench/pretrain_throughput.py's shapes build the architectures they name for both trainers (nothing trains), and
its profile categories sort ops as documented."""

from __future__ import annotations

import pytest
from helpers import ROOT, load_script

bench = load_script(ROOT / "bench" / "pretrain_throughput.py")


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_the_default_shape_is_the_recipe_unchanged():
    from mm_ptft.config import load_config

    assert load_config(bench.CONFIG, bench.shape_overrides("fm-vit-t")) == load_config(bench.CONFIG)
    assert bench.SHAPES["fm-vit-t"].gemm(128) == (6400, 192, 768)  # the GEMM the limit was always measured at


def test_b16_shape_is_open_clip_vit_b_16_in_both_trainers():
    open_clip = pytest.importorskip("open_clip")
    import torch

    from mm_ptft.config import load_config
    from mm_ptft.models import create_model

    # the reference: the config open_clip ships as ViT-B-16
    assert open_clip.get_model_config("ViT-B-16") == bench.OPEN_CLIP_B16
    with torch.device("meta"):  # shapes and parameter counts only: no memory, no initialisation work
        reference = open_clip.model.CLIP(**bench.OPEN_CLIP_B16)
    assert reference.visual.image_size == (224, 224) and reference.visual.grid_size == (14, 14)
    assert reference.context_length == 77

    cfg = load_config(bench.CONFIG, bench.shape_overrides("b16"))
    assert cfg.data.batch_size == 16 and cfg.model.text.context_length == 77
    assert load_config(bench.CONFIG, bench.shape_overrides("b16", 2)).data.batch_size == 2
    with torch.device("meta"):
        model = create_model(cfg.model)
    patch_embed = model.image.trunk.patch_embed
    assert tuple(patch_embed.img_size) == (224, 224) and patch_embed.num_patches == 196
    assert model.image.width == 768 and len(model.image.trunk.blocks) == 12
    text = model.text.transformer.config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (512, 12, 8)

    # whole model within 15 % (ours has the smaller WordPiece vocabulary: 30522 × 512 against 49408 × 512) ...
    ours, theirs = _params(model), _params(reference)
    assert abs(ours - theirs) / theirs < 0.15, (ours, theirs)
    # ... the image towers equal, and a text layer within 1 % (GeGLU 3 · 512 · 1368 against GELU 2 · 512 · 2048)
    assert _params(model.image) == pytest.approx(_params(reference.visual), rel=0.01)
    layer = _params(model.text.transformer.layers[0])
    assert layer == pytest.approx(_params(reference.transformer.resblocks[0]), rel=0.01)
    assert bench.SHAPES["b16"].gemm(16) == (16 * 197, 768, 3072)


@pytest.mark.parametrize(
    ("name", "region", "category"),
    [
        ("aten::addmm", "", "matrix products"),
        ("aten::mm", "", "matrix products"),
        ("aten::convolution_backward", "", "matrix products"),
        ("aten::_softmax_backward_data", "", "attention"),
        ("aten::_scaled_dot_product_flash_attention_for_cpu", "", "attention"),
        ("aten::native_layer_norm", "", "elementwise + normalisation"),
        ("aten::_to_copy", "", "elementwise + normalisation"),
        ("aten::mul_", "optimizer", "optimizer"),  # AdamW's own elementwise work
        ("aten::_foreach_add_", "", "optimizer"),
        ("Optimizer.step#AdamW.step", "", "optimizer"),
        ("gloo:all_reduce", "", "communication"),
        ("enumerate(DataLoader)#_MultiProcessingDataLoaderIter.__next__", "", "data wait"),
        ("aten::view", "", None),
        ("autograd::engine::evaluate_function: AddmmBackward0", "", None),
    ],
)
def test_profile_categories(name, region, category):
    assert bench.profile_category(name, region) == category


def test_profile_table_leaves_the_rest_of_the_wall_time_to_python():
    ops = [
        {"name": "aten::mm", "region": "", "cpu_ms": 50.0, "device_ms": 0.0, "count": 4},
        {"name": "aten::add", "region": "", "cpu_ms": 10.0, "device_ms": 0.0, "count": 2},
        {"name": "aten::view", "region": "", "cpu_ms": 5.0, "device_ms": 0.0, "count": 9},
    ]
    table = bench.profile_table({"device": "cpu", "wall_ms": 100.0, "phases_ms": {}, "ops": ops})
    ms = {row["category"]: row["ms"] for row in table["rows"]}
    assert ms["matrix products"] == 50.0 and ms["elementwise + normalisation"] == 10.0
    assert ms["Python / other"] == 40.0 and sum(row["share"] for row in table["rows"]) == pytest.approx(1.0)
    assert table["largest_other_ops_ms"] == {"aten::view": 5.0}


# ---------------------------------------------------------------------------------------------------------------------
# bench/scaling.py: the model family it tables, and a launch that outgrows the machine's memory is stopped
# ---------------------------------------------------------------------------------------------------------------------
scaling = load_script(ROOT / "bench" / "scaling.py")


@pytest.mark.parametrize(
    "size,timm_name", [("T", "vit_tiny_patch16_224"), ("S", "vit_small_patch16_224"), ("B", "vit_base_patch16_224")]
)
def test_scaling_towers_are_timm_vits_of_their_name(size, timm_name):
    """The overrides of a size build the image trunk of timm's model of that name with the recipe's ln_pre
    (``pre_norm``): its parameter count exactly, less its classifier head; and the text tower the table names."""
    import timm
    import torch

    from mm_ptft.config import load_config
    from mm_ptft.models import create_model

    cfg = load_config(bench.CONFIG, scaling.overrides(size, 12, 4))
    assert cfg.data.batch_size == 4 and cfg.model.image.image_size == 224
    with torch.device("meta"):
        model = create_model(cfg.model)
        reference = timm.create_model(timm_name, num_classes=0, pre_norm=True)
    assert _params(model.image.trunk) == _params(reference)
    text = model.text.transformer.config
    t = scaling.TOWERS[size]
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (t.text_width, 12, t.text_heads)
    assert scaling.image_tokens(size) == 197 and scaling.gemm(size, 2) == (394, t.width, 4 * t.width)


def test_scaling_text_mlp_matches_b16_and_largest_models_ascend():
    assert scaling.geglu_intermediate(512) == 1368  # the b16 shape's text tower (bench/pretrain_throughput.py)
    assert "model.text.config.intermediate_size=1368" in bench.B16_OVERRIDES
    sizes = [scaling.parameters(scaling.overrides(s, n, 2)) for s, n in scaling.LARGEST]
    assert sizes == sorted(sizes) and sizes[-1] > 1e9


def test_a_launch_below_the_memory_reserve_is_stopped_as_out_of_memory(tmp_path):
    """A reserve above what the machine has: the launch is killed at once, with its ranks, as an error row."""
    import time

    import psutil

    before = {p.pid for p in psutil.process_iter()}
    t0 = time.time()
    row = bench.run_mm_ptft(tmp_path, "oom", 0, "bf16", 2, 2, [], min_available_mb=1e9)
    assert row == {"name": "oom", "error": "out of memory (available fell below 1000000000 MB)"}
    assert time.time() - t0 < 30
    time.sleep(0.5)
    left = [
        p
        for p in psutil.process_iter(["cmdline"])
        if p.pid not in before and "mm_ptft" in " ".join(p.info["cmdline"] or [])
    ]
    assert not left, left
