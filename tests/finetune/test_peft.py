"""Parameter-efficient fine-tuning (``finetune.policy`` lora / ia3 / bias): what trains, what is logged, merging,
peft's own adapter format, exact resume, one-line errors.

The references are independent of the code under test: peft's own unmerged forward pass (the adapted model) for the
merged weights, a plain tower with no adapters for what the merged weights load into, ``peft.PeftModel.from_pretrained``
on a bare timm / transformers model for the adapter directory, the layer shapes (r · (in + out) per LoRA layer) for
the logged parameter counts, and an uninterrupted run for a resumed one.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from helpers import FT_TINY, TEXT_TINY, records, summary_of, tiny_overrides
from torch import nn

from mm_ptft import checkpoint as ckpt
from mm_ptft.cli import main
from mm_ptft.config import ConfigError, load_config
from mm_ptft.finetune import parameter_counts
from mm_ptft.finetune.peft import save_adapter, trunk_of
from mm_ptft.tasks import create_task, for_loading, load_trained

pytest.importorskip("peft")

CNN_TINY = FT_TINY.parent / "fmnist-cnn-full-tiny.yaml"
CNN_LORA_TINY = FT_TINY.parent / "fmnist-cnn-lora-tiny.yaml"
TEXT_LORA_TINY = FT_TINY.parent / "fortunes-minilm-lora-tiny.yaml"
TOWERS = {"vit": FT_TINY, "cnn": CNN_TINY, "text": TEXT_TINY}
ADAPTER_MARKS = (".lora_", ".ia3_l.")


def model_cfg(tower: str, policy: str, *extra: str):
    """A tiny tower's classifier config that builds without data: random init, three named classes."""
    return load_config(
        TOWERS[tower],
        ["finetune.init=null", "finetune.head_init=random", "finetune.classnames=[a,b,c]",
         f"finetune.policy={policy}", *extra],
    )  # fmt: skip


def example_input(cfg) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    if cfg.task == "text-classification":
        ids = torch.randint(1000, 2000, (3, 16), generator=generator)
        return ids, torch.ones_like(ids)
    size = cfg.model.image.image_size
    return (torch.randn(3, cfg.model.image.in_chans, size, size, generator=generator),)


def trained_looking(model: nn.Module) -> None:
    """Move every adapter (and BatchNorm statistics) off its identity start, as training would."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
            elif ".ia3_l." in name:
                param.copy_(1 + 0.3 * torch.randn(param.shape, generator=generator))
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=generator))
                module.running_var.copy_(1 + 0.2 * torch.rand(module.running_var.shape, generator=generator))


def outputs(model: nn.Module, x: tuple[torch.Tensor, ...]) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(*x)


@pytest.mark.parametrize("policy", ["lora", "ia3"])
@pytest.mark.parametrize("tower", ["vit", "cnn", "text"])
def test_merged_weights_compute_what_the_adapted_tower_does(tower, policy, tmp_path):
    """Merged (plain-named) weights in a plain tower = peft's unmerged forward (1e-5, fp32); the same weights load
    back into an adapted model (adapters at the identity) and into peft's own format, which peft loads back onto a
    bare timm / transformers model and which again computes what the adapted tower does."""
    import peft

    cfg = model_cfg(tower, policy)
    torch.manual_seed(0)
    adapted = create_task(cfg).model
    start = ckpt.merge_adapters(adapted.state_dict(), cfg.finetune.lora.alpha)  # adapters at the identity: the start
    trained_looking(adapted)
    x = example_input(cfg)
    want = outputs(adapted, x)
    state = {k: v.detach().clone() for k, v in adapted.state_dict().items()}

    merged = ckpt.merge_adapters(state, cfg.finetune.lora.alpha)
    assert not any(ckpt.BASE_LAYER in k or k.endswith(ADAPTER_MARKS) or ".lora_" in k for k in merged)
    plain_cfg = copy.deepcopy(cfg)
    plain_cfg.finetune.policy = "full"
    plain = create_task(plain_cfg).model
    ckpt.load_model_weights(plain, merged)  # strict: exactly the plain tower's names and shapes
    torch.testing.assert_close(outputs(plain, x), want, atol=1e-5, rtol=0)

    reloaded = create_task(cfg).model  # as load_trained builds it: adapters, then merged weights
    ckpt.load_model_weights(reloaded, merged)
    torch.testing.assert_close(outputs(reloaded, x), want, atol=1e-5, rtol=0)

    save_adapter(cfg, state, tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "adapter").iterdir()}
    # peft's user: the tower's library model with the start's weights (BatchNorm statistics included), the adapter
    # dir on top
    base = create_task(plain_cfg).model
    ckpt.load_model_weights(base, start)
    _, bare = trunk_of(base.tower)
    loaded = peft.PeftModel.from_pretrained(bare, str(tmp_path / "adapter")).eval()
    _, adapted_trunk = trunk_of(adapted.tower)
    with torch.no_grad():
        if tower == "text":
            got, ref = (m(input_ids=x[0], attention_mask=x[1]).last_hidden_state for m in (loaded, adapted_trunk))
        else:
            got, ref = loaded(x[0]), adapted_trunk(x[0])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("policy", ["lora", "ia3", "bias"])
@pytest.mark.parametrize("tower", ["vit", "cnn", "text"])
def test_only_the_small_part_and_the_head_train(tower, policy):
    model = create_task(model_cfg(tower, policy)).model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    inside = [n for n in trainable if not n.startswith("head.")]
    assert {"head.weight", "head.bias"} <= set(trainable) and inside
    if policy == "bias":
        assert all(n.endswith(".bias") for n in inside)
    else:
        assert all(any(m in n for m in ADAPTER_MARKS) for n in inside)
        assert all(not p.requires_grad for n, p in model.named_parameters() if not any(m in n for m in ADAPTER_MARKS)
                   and not n.startswith("head."))  # fmt: skip
    counts = parameter_counts(model)
    tower_params = [(n, p) for n, p in model.tower.named_parameters()]
    assert counts["params/tower_trainable"] == sum(p.numel() for n, p in tower_params if p.requires_grad)
    assert counts["params/tower"] == sum(p.numel() for n, p in tower_params if not any(m in n for m in ADAPTER_MARKS))


def lora_layer_sizes(tower: nn.Module, rank: int) -> int:
    """r · (in + out) for every Linear of a ViT's blocks: its LoRA parameters, counted by hand."""
    total = 0
    for name, module in tower.trunk.named_modules():
        if name.startswith("blocks.") and isinstance(module, nn.Linear):
            total += rank * (module.in_features + module.out_features)
    return total


def lora_run(data: Path, out: Path, name: str, pretrained: Path, *extra: str) -> Path:
    overrides = [*tiny_overrides(data, out, name), f"finetune.init={pretrained}", "finetune.policy=lora",
                 "finetune.lora.rank=4", "finetune.lora.dropout=0.1", "deepspeed.zero_stage=2", "optim.lr=5e-3",
                 "deepspeed.precision=fp32", "train.steps=6", "eval.every=3", "eval.max_samples=64"]  # fmt: skip
    assert main(["train", "-c", str(FT_TINY), *overrides, *extra]) == 0
    return out / name


@pytest.fixture(scope="module")
def lora_vit(pretrained, fmnist_tiny, tmp_path_factory) -> Path:
    """A LoRA fine-tune of the tiny pretrained ViT: 1 rank, ZeRO-2, fp32, dropout on the adapters, 6 steps."""
    return lora_run(fmnist_tiny, tmp_path_factory.mktemp("peft"), "lora", pretrained)


def test_lora_run_logs_its_share_and_saves_merged_weights_and_the_adapter(lora_vit, pretrained, tmp_path):
    run = lora_vit
    cfg = load_config(run / "config.yaml")
    start = [r for r in records(run, "train") if "params/trainable" in r]
    summary = summary_of(run)
    plain = for_loading(cfg)
    plain.finetune.policy = "full"
    plain_model = create_task(plain).model
    head = sum(p.numel() for p in plain_model.head.parameters())
    lora = lora_layer_sizes(plain_model.tower, 4)
    tower = sum(p.numel() for p in plain_model.tower.parameters())
    want = {"params/trainable": lora + head, "params/tower": tower, "params/tower_trainable": lora,
            "params/total": tower + lora + head}  # fmt: skip
    for record in (start[0], summary):
        assert {k: record[k] for k in want} == want
        assert record["params/tower_trainable_share"] == pytest.approx(lora / tower)
        assert record["params/trainable_share"] == pytest.approx((lora + head) / (tower + lora + head))
    assert "| Trainable parameters |" in (run / "report.md").read_text()

    # model.safetensors / best.safetensors / consolidation: the merged tower under plain names
    final = ckpt.load_weights(run / "model.safetensors")
    assert final.keys() == plain_model.state_dict().keys()
    assert ckpt.load_weights(run / "best.safetensors").keys() == final.keys()
    tag = ckpt.resolve_resume(run / "checkpoints", "latest")
    consolidated = ckpt.consolidate(tag)
    assert all(torch.equal(consolidated[k], final[k]) for k in final)
    ckpt.load_model_weights(plain_model, final)
    # … which computes what the run's adapted model (its unmerged checkpoint weights) does
    adapted = create_task(for_loading(cfg))
    ckpt.load_model_weights(adapted.model, ckpt.consolidate(tag, merge=False))
    x = example_input(cfg)
    want_logits = outputs(adapted.model, x)
    torch.testing.assert_close(outputs(plain_model, x), want_logits, atol=1e-5, rtol=0)
    _, task = load_trained(run / "model.safetensors")  # what mm-ptft eval builds
    torch.testing.assert_close(outputs(task.model, x), want_logits, atol=1e-5, rtol=0)

    # the adapters in peft's format, final and best
    for adapter in ("adapter", "adapter-best"):
        config = json.loads((run / adapter / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 16.0
    # mm-ptft export from the checkpoint directory (consolidated and merged on the fly) to timm
    assert main(["export", str(tag), "--out", str(tmp_path / "export"), "--to", "timm"]) == 0
    from safetensors.torch import load_file

    timm_state = load_file(str(tmp_path / "export" / "timm" / "model.safetensors"))
    assert all(torch.equal(timm_state[k], final[f"image.trunk.{k}"]) for k in timm_state)


def test_lora_run_resumes_exactly(lora_vit, pretrained, fmnist_tiny, tmp_path):
    """Stopped after 3 of 6 steps and resumed in a new Trainer: the same merged weights and adapters as the
    uninterrupted run (adapter dropout included: the RNG resumes with the data position)."""
    lora_run(fmnist_tiny, tmp_path, "cut", pretrained, "train.save_every=3", "train.stop_after=3", "train.report=false")
    cut = lora_run(fmnist_tiny, tmp_path, "cut", pretrained, "train.resume=latest", "train.report=false")
    # the counts come with the first train record of each start: the second start resumed at step 3
    assert [r["step"] for r in records(cut, "train") if "params/trainable" in r] == [2, 4]
    whole, resumed = (ckpt.load_weights(r / "model.safetensors") for r in (lora_vit, cut))
    assert whole.keys() == resumed.keys()
    for k in whole:
        torch.testing.assert_close(resumed[k], whole[k], atol=1e-6, rtol=0, msg=k)
    from safetensors.torch import load_file

    a, b = (load_file(str(r / "adapter" / "adapter_model.safetensors")) for r in (lora_vit, cut))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    moved = max(v.abs().max().item() for k, v in a.items() if "lora_B" in k)  # B starts at 0
    assert moved > 1e-3, moved  # the adapters trained far beyond the tolerance the resume is held to


def test_text_lora_twin_under_zero3(fmnist_tiny, tmp_path):
    """The text LoRA recipe's tiny twin under ZeRO-3 (1 rank: the parameters are partitioned all the same), on the
    captions: consolidation gathers and merges, the adapter dir is a transformers peft adapter."""
    overrides = [*tiny_overrides(fmnist_tiny, tmp_path, "text"), "deepspeed.zero_stage=3", "deepspeed.precision=fp32",
                 "train.steps=4", "eval.max_samples=64", "train.report=false"]  # fmt: skip
    assert main(["train", "-c", str(TEXT_LORA_TINY), *overrides]) == 0
    run = tmp_path / "text"
    final = ckpt.load_weights(run / "model.safetensors")
    assert final and not any(ckpt.BASE_LAYER in k or ".lora_" in k for k in final)
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert summary_of(run)["params/tower_trainable"] > 0


def test_cnn_lora_twin_writes_an_adapter_peft_loads(fmnist_tiny, tmp_path):
    """The CNN LoRA recipe's tiny twin (random start, ZeRO-0): its BatchNorm statistics moved in training, and the
    adapter dir carries them, so peft on the bare starting timm model computes what the run's tower does."""
    import peft

    overrides = [*tiny_overrides(fmnist_tiny, tmp_path, "cnn"), "finetune.init=null", "finetune.head_init=random",
                 "deepspeed.zero_stage=0", "deepspeed.precision=fp32", "train.steps=4", "eval.max_samples=64",
                 "train.report=false"]  # fmt: skip
    assert main(["train", "-c", str(CNN_LORA_TINY), *overrides]) == 0
    run = tmp_path / "cnn"
    cfg = load_config(run / "config.yaml")
    torch.manual_seed(cfg.train.seed)  # the Trainer's seed before it builds the task: the same random start
    start = create_task(copy.deepcopy(cfg)).model.state_dict()
    start = ckpt.merge_adapters(start, cfg.finetune.lora.alpha)  # adapters at the identity: plain start weights
    trained = create_task(for_loading(cfg)).model
    ckpt.load_model_weights(trained, ckpt.consolidate(ckpt.resolve_resume(run / "checkpoints", "latest"), merge=False))
    name = "image.trunk.bn1.running_mean"
    assert not torch.equal(trained.state_dict()[name], start[name])  # the statistics moved
    plain = for_loading(cfg)
    plain.finetune.policy = "full"
    base = create_task(plain).model
    ckpt.load_model_weights(base, start)
    loaded = peft.PeftModel.from_pretrained(base.image.trunk, str(run / "adapter")).eval()
    x = example_input(cfg)[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), trained.eval().image.trunk(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["finetune.lora.rank=0"], "finetune.lora.rank must be >= 1"),
        (["finetune.lora.dropout=1.0"], "finetune.lora.dropout must be in [0, 1)"),
        (["finetune.lora.target_modules=[fc3]"], "finetune.lora.target_modules: 'fc3' matches no layer"),
        (["finetune.lora.target_modules=[norm1]"], "adapters go on Linear and ungrouped Conv2d layers"),
        (["finetune.policy=ia3", "deepspeed.zero_stage=3"], "finetune.policy=ia3 needs deepspeed.zero_stage <= 2"),
        (
            ["finetune.policy=ia3", "finetune.ia3.target_modules=[qkv]", "finetune.ia3.feedforward_modules=[fc2]"],
            "finetune.ia3.feedforward_modules: blocks.0.mlp.fc2 is not one of the targets",
        ),
    ],  # fmt: skip
    ids=["rank", "dropout", "unknown-target", "not-a-layer", "ia3-zero3", "feedforward-outside"],
)
def test_bad_settings_are_one_line_errors(overrides, message, fmnist_tiny, tmp_path, capsys):
    args = [*tiny_overrides(fmnist_tiny, tmp_path), "finetune.init=null", "finetune.head_init=random"]
    policy = [] if any(o.startswith("finetune.policy") for o in overrides) else ["finetune.policy=lora"]
    assert main(["train", "-c", str(FT_TINY), *args, *policy, *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err, err


def test_a_tower_without_default_targets_names_the_key():
    """IA3's defaults name keys, values and MLP outputs of known layer layouts; DistilBERT's are not among them."""
    distil = ("model.text.config={model_type: distilbert, vocab_size: 30522, dim: 32, n_layers: 1, n_heads: 2, "
              "hidden_dim: 64, max_position_embeddings: 64}")  # fmt: skip
    with pytest.raises(ConfigError, match="set finetune.ia3.target_modules") as info:
        create_task(model_cfg("text", "ia3", distil))
    assert "\n" not in str(info.value)
    model = create_task(model_cfg("text", "ia3", distil, "finetune.ia3.target_modules=[v_lin, lin2]",
                                  "finetune.ia3.feedforward_modules=[lin2]")).model  # fmt: skip
    assert sum(".ia3_l." in n for n, _ in model.named_parameters()) == 2


def test_wise_ft_of_a_lora_run_interpolates_plain_weights(pretrained, fmnist_tiny, tmp_path):
    """WiSE-FT's ends on a LoRA run: alpha=0 is the zero-shot start (its identity adapters merged to plain names),
    alpha=1 the best fine-tuned checkpoint (merged)."""
    overrides = [*tiny_overrides(fmnist_tiny, tmp_path, "lora"), f"finetune.init={pretrained}", "train.report=false",
                 "finetune.policy=lora", "finetune.lora.rank=2", "deepspeed.precision=fp32", "train.steps=6",
                 "eval.every=3", "optim.lr=1e-2", "optim.warmup_steps=0"]  # fmt: skip
    assert main(["train", "-c", str(FT_TINY), *overrides]) == 0
    run = tmp_path / "lora"
    evals = records(run, "eval")
    assert main(["wise-ft", str(run), "--alphas", "0,1", "--out", str(tmp_path / "wise")]) == 0
    rows = json.loads((tmp_path / "wise" / "wise_ft.json").read_text())["rows"]
    assert rows[0]["acc1"] == pytest.approx(evals[0]["classification/acc1"], abs=1e-6)  # eval.at_start: step 0
    assert rows[1]["acc1"] == pytest.approx(summary_of(run)["best/classification/acc1"], abs=1e-6)


@pytest.mark.parametrize("policy", ["lora", "last-n"])
def test_zero1_consolidates_the_frozen_weights_too(policy, pretrained, fmnist_tiny, tmp_path):
    """DeepSpeed records frozen parameters for ZeRO >= 2 only; a ZeRO-1 run's consolidated weights still hold every
    tensor (from the module state), equal to the same run under ZeRO-0."""
    weights = {}
    for stage in (0, 1):
        overrides = [*tiny_overrides(fmnist_tiny, tmp_path, f"z{stage}"), f"finetune.init={pretrained}",
                     f"finetune.policy={policy}", "deepspeed.precision=fp32", f"deepspeed.zero_stage={stage}",
                     "train.steps=3", "train.report=false", "eval.every=0", "eval.at_start=false",
                     "eval.max_samples=16"]  # fmt: skip
        assert main(["train", "-c", str(FT_TINY), *overrides]) == 0
        weights[stage] = ckpt.load_weights(tmp_path / f"z{stage}" / "model.safetensors")
    assert weights[1].keys() == weights[0].keys()
    for k, v in weights[0].items():
        torch.testing.assert_close(weights[1][k], v, rtol=1e-5, atol=1e-6, msg=k)
