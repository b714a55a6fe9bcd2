"""Image classification fine-tuning: zero-shot head, WiSE-FT ends, freeze policies, one-line errors.

The references are independent computations: the ``zeroshot`` evaluator of the pretrained dual encoder (open_clip's
classifier builder over ``encode_image`` features) for the zero-shot head and α=0, the Trainer's own in-training
evaluation for α=1, and the pretrained weights themselves for what a policy may not touch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import load_script, tiny_overrides, tower_groups

from mm_ptft.checkpoint import load_weights
from mm_ptft.cli import main
from mm_ptft.config import load_config
from mm_ptft.eval import evaluate_model
from mm_ptft.tasks import create_task, load_trained

ROOT = Path(__file__).resolve().parents[2]
FT_TINY = str(ROOT / "configs" / "finetune" / "fmnist-full-tiny.yaml")
EVAL_N = 256  # the tiny fine-tune twin's eval.max_samples


def zeroshot_metrics(pretrained: Path, data: Path, n: int = EVAL_N) -> dict:
    cfg, task = load_trained(
        pretrained, None, [f"eval.data={data}", f"eval.max_samples={n}", "eval.evaluators=[zeroshot]"]
    )
    return evaluate_model(cfg, task)


def ft_overrides(data: Path, out: Path, name: str, pretrained: Path, *extra: str) -> list[str]:
    return [*tiny_overrides(data, out, name), f"finetune.init={pretrained}", "train.report=false", *extra]


def test_zeroshot_head_starts_at_the_zeroshot_accuracy(pretrained, fmnist_tiny):
    from mm_ptft.models import create_tokenizer, tokenize
    from mm_ptft.models.zeroshot import zeroshot_classifier

    cfg = load_config(FT_TINY, [f"data.train={fmnist_tiny}", f"eval.data={fmnist_tiny}", f"finetune.init={pretrained}"])
    task = create_task(cfg).eval()
    ft = evaluate_model(cfg, task)
    zs = zeroshot_metrics(pretrained, fmnist_tiny)
    assert zs["zeroshot/acc1"] > 0.15  # the pretrained model is better than chance, so agreement means something
    for name in ("acc1", "acc5", "mean_per_class_recall"):
        assert ft[f"classification/{name}"] == pytest.approx(zs[f"zeroshot/{name}"], abs=1e-6), name
    # beyond accuracy: the logits are the dual encoder's zero-shot similarities times its temperature
    _, dual = load_trained(pretrained)
    tokenizer = create_tokenizer(cfg.model.text)
    templates = json.loads((fmnist_tiny / "dataset.json").read_text())["templates"]
    classifier = zeroshot_classifier(
        dual.model, lambda t: tokenize(tokenizer, t, cfg.model.text.context_length), task.classnames, templates,
        torch.device("cpu"),
    )  # fmt: skip
    images = torch.randn(4, 3, 28, 28)
    with torch.no_grad():
        expected = dual.model.get_logit_scale() * dual.model.encode_image(images) @ classifier
        assert torch.allclose(task.model(images), expected, atol=1e-4)


def test_finetune_improves_and_wise_ft_ends_reproduce_zeroshot_and_finetuned(pretrained, fmnist_tiny, tmp_path):
    run = tmp_path / "ft"
    extra = ["deepspeed.precision=fp32", "train.steps=16", "eval.every=4", "optim.lr=1e-3", "optim.warmup_steps=0",
             "optim.layer_decay=null", "finetune.label_smoothing=0.0"]  # fmt: skip
    assert main(["train", "-c", FT_TINY, *ft_overrides(fmnist_tiny, tmp_path, "ft", pretrained, *extra)]) == 0
    assert (run / "best.safetensors").is_file() and (run / "model.safetensors").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    summary = records[-1]
    zs = zeroshot_metrics(pretrained, fmnist_tiny)["zeroshot/acc1"]
    # eval.at_start: step 0 is evaluated, and it is the zero-shot classifier of the dual encoder
    assert [e["step"] for e in evals] == [0, 4, 8, 12, 16]
    assert evals[0]["classification/acc1"] == pytest.approx(zs, abs=1e-6)
    best = summary["best/classification/acc1"]
    assert best == max(e["classification/acc1"] for e in evals)  # best-checkpoint selection, the start included
    assert summary["best_step"] > 0 and best > zs + 0.05  # fine-tuning beats the zero-shot start on the tiny set

    assert main(["wise-ft", str(run), "--alphas", "0,0.5,1", "--out", str(tmp_path / "wise")]) == 0
    rows = json.loads((tmp_path / "wise" / "wise_ft.json").read_text())["rows"]
    assert [r["alpha"] for r in rows] == [0.0, 0.5, 1.0]
    assert rows[0]["acc1"] == pytest.approx(zs, abs=1e-6)  # α=0 is the zero-shot classifier
    assert rows[-1]["acc1"] == pytest.approx(best, abs=1e-6)  # α=1 is the best fine-tuned checkpoint
    assert (tmp_path / "wise" / "wise_ft.png").stat().st_size > 0
    assert "| 0.50 |" in (tmp_path / "wise" / "wise_ft.md").read_text()


def test_last_n_trains_only_the_last_blocks_with_mixup(pretrained, fmnist_tiny, tmp_path):
    unlocked = 2
    extra = [
        "finetune.policy=last-n",
        f"finetune.unlocked_groups={unlocked}",
        "finetune.head_init=random",
        "finetune.mixup=0.8",
        "finetune.cutmix=1.0",
        "finetune.label_smoothing=0.1",
        "deepspeed.precision=fp32",
        "train.steps=4",
        "optim.lr=1e-2",
        "optim.warmup_steps=0",
    ]
    assert main(["train", "-c", FT_TINY, *ft_overrides(fmnist_tiny, tmp_path, "lastn", pretrained, *extra)]) == 0
    out = tmp_path / "diff"
    assert main(["diff", str(pretrained), str(tmp_path / "lastn"), "--probe", str(fmnist_tiny), "--max-samples", "64",
                 "--out", str(out)]) == 0  # fmt: skip
    result = json.loads((out / "diff.json").read_text())
    # the reference is the tower's own grouping (embeddings, blocks, a final norm group if the pooling has one, proj)
    n_trunk = len(tower_groups(tmp_path / "lastn")) - 1
    rows = result["weight_change"]
    assert len(rows) == n_trunk + 1 and n_trunk > unlocked
    frozen, trained = rows[: n_trunk - unlocked], rows[n_trunk - unlocked : n_trunk]
    assert all(r["relative_change"] == 0 for r in frozen) and rows[-1]["relative_change"] == 0  # proj unused: frozen
    assert all(r["relative_change"] > 1e-4 for r in trained), trained
    labels = [r["group"] for r in rows]
    cka = {c["layer"]: c["cka"] for c in result["cka"]}
    blocks = [layer for layer in cka if layer in labels]
    assert blocks  # per-block features were compared
    for layer in blocks:  # a block's output is unchanged exactly when it and everything before it is frozen
        if labels.index(layer) < n_trunk - unlocked:
            assert cka[layer] == pytest.approx(1.0, abs=1e-9), layer
        else:
            assert cka[layer] < 1.0, layer
    assert cka["pooled"] < 1.0
    assert (out / "diff.png").stat().st_size > 0
    state = load_weights(tmp_path / "lastn" / "model.safetensors")
    assert state["head.weight"].shape == (10, 32)  # random head on pooled trunk features (width 32)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_checkpoint_of_another_shape_is_one_line(pretrained, fmnist_tiny, tmp_path, capsys):
    args = ft_overrides(
        fmnist_tiny, tmp_path, "bad", pretrained, "model.image.kwargs.embed_dim=48", "finetune.head_init=random"
    )
    assert main(["train", "-c", FT_TINY, *args]) == 2
    err = _one_line_error(capsys)
    assert "does not fit this model" in err and "shape mismatches" in err and "image.*" in err


def test_duplicate_class_name_file_is_one_line(pretrained, fmnist_tiny, tmp_path, capsys):
    names = tmp_path / "classes.txt"
    names.write_text("t-shirt\ntrouser\nbag\ndress\nbag\n")
    assert (
        main(
            [
                "train",
                "-c",
                FT_TINY,
                *ft_overrides(fmnist_tiny, tmp_path, "dup", pretrained, f"finetune.classnames={names}"),
            ]
        )
        == 2
    )
    assert _one_line_error(capsys) == (
        f"error: config: duplicate class name 'bag' in finetune.classnames ({names}) (entries 2 and 4)"
    )


def test_label_outside_the_class_list_is_one_line(pretrained, fmnist_tiny, tmp_path, capsys):
    names = tmp_path / "classes.txt"
    names.write_text("t-shirt\ntrouser\npullover\ndress\ncoat\n")  # 5 of the 10 classes the shards use
    args = ft_overrides(
        fmnist_tiny, tmp_path, "labels", pretrained, f"finetune.classnames={names}", "finetune.head_init=random"
    )
    # met by the first training batch …
    assert main(["train", "-c", FT_TINY, *args, "eval.at_start=false"]) == 2
    err = _one_line_error(capsys)
    assert err.startswith("error: data: label ") and "is outside the 5 classes" in err and "of sample 'train-" in err
    # … or by the step-0 evaluation of the held-out split, which comes first when eval.at_start is on
    assert main(["train", "-c", FT_TINY, *args, "eval.at_start=true"]) == 2
    err = _one_line_error(capsys)
    assert err.startswith("error: data: held-out label ") and "is outside the 5 classes" in err


def test_every_finetune_recipe_loads_and_has_a_tiny_twin():
    configs = sorted((ROOT / "configs" / "finetune").glob("*.yaml"))
    full = [c for c in configs if not c.stem.endswith("-tiny")]
    assert len(full) >= 6
    for config in full:
        twin = config.with_name(f"{config.stem}-tiny.yaml")
        assert twin.is_file(), f"{config.name} has no tiny twin"
        for path in (config, twin):
            cfg = load_config(path)
            assert cfg.task in ("classification", "text-classification"), path
        assert load_config(config).finetune.policy == load_config(twin).finetune.policy, config.name


def test_transfer_study_tiny_twin_trains_every_cell_from_the_right_start(fmnist_tiny, tmp_path):
    """The study's wiring: pretrained cells start from the pretraining weights (a frozen linear-probe tower keeps
    them exactly), scratch cells do not; every cell is tested and lands in the table and the plot."""
    study = load_script(ROOT / "bench" / "transfer_study.py")
    pre = tmp_path / "pre-cnn"
    pre_tiny = str(ROOT / "configs" / "pretrain-fmnist-cnn-tiny.yaml")
    overrides = [*tiny_overrides(fmnist_tiny, tmp_path, "pre-cnn"), "deepspeed.precision=fp32", "train.steps=4"]
    assert main(["train", "-c", pre_tiny, *overrides, "train.report=false", "eval.max_samples=64"]) == 0
    data = tmp_path / "fmnist-tiny"  # a private copy: `prepare` writes the subsets beside it
    shutil.copytree(fmnist_tiny, data)
    assert study.main(["prepare", "--data", str(data), "--fractions", "0.1,1"]) == 0
    assert (
        json.loads((tmp_path / "fmnist-tiny-f0.1" / "dataset.json").read_text())["splits"]["train"]["num_samples"] == 60
    )  # 10 % of each class of the 600 training images
    out = tmp_path / "study"
    config = str(ROOT / "configs" / "finetune" / "fmnist-study-tiny.yaml")
    args = ["run", "--pretrained", str(pre), "--out", str(out), "--data", str(data), "--config", config,
            "--fractions", "0.1,1", "--steps-scale", "0.01", "deepspeed.precision=fp32"]  # fmt: skip
    assert study.main(args) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert len(rows) == 2 * 4 * 2  # fractions × policies (linear-probe, last-n, full, lora) × starts
    assert all(r["steps"] == max(1, round(study.POLICY[r["policy"]]["steps"] * 0.01)) for r in rows)
    assert all(0.0 <= r["test_acc1"] <= 1.0 for r in rows)
    share = {r["policy"]: r["tower_trainable_share"] for r in rows}
    assert share["linear-probe"] == 0.0 and share["full"] > 0.9 and 0.0 < share["lora"] < 0.2
    pre_state = load_weights(pre / "model.safetensors")
    runs = out / "runs"
    probe_pre = load_weights(runs / "f0.1-linear-probe-pretrained" / "model.safetensors")
    probe_scratch = load_weights(runs / "f0.1-linear-probe-scratch" / "model.safetensors")
    name = "image.trunk.layer4.1.conv2.weight"
    assert torch.equal(probe_pre[name], pre_state[name])  # the frozen tower is the pretrained one …
    assert not torch.allclose(probe_scratch[name], pre_state[name])  # … and the scratch tower is not
    # a last-n CNN cell diffed with its start (its locked stages hold FrozenBatchNorm2d): only the last 2 groups moved
    diff = tmp_path / "diff"
    assert main(["diff", str(pre), str(runs / "f1-last-n-pretrained"), "--probe", str(data), "--max-samples", "32",
                 "--out", str(diff)]) == 0  # fmt: skip
    change = [r["relative_change"] for r in json.loads((diff / "diff.json").read_text())["weight_change"]]
    assert all(c == 0 for c in change[:-3]) and all(c > 0 for c in change[-3:-1]) and change[-1] == 0  # proj unused
    table = (out / "results.md").read_text()
    assert table.count("| 10% |") == 4 and table.count("| 100% |") == 4
    assert (out / "transfer.png").stat().st_size > 0
    assert study.main(args) == 0  # finished cells are skipped, not trained again
    assert len(json.loads((out / "results.json").read_text())["rows"]) == 16
