"""Exports reloaded by their own libraries (timm, transformers, open_clip, onnxruntime, CLIP_benchmark) and compared
with the mm-ptft model's outputs; ZeRO-3 vs ZeRO-0 exports of the same weights; one-line errors on bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_overrides
from PIL import Image

from data_tools.verify import iter_tar_samples
from mm_ptft.cli import main
from mm_ptft.tasks import load_trained

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "pretrain-fmnist-tiny.yaml")
# a dual encoder open_clip 3.3 can represent: a timm model at its default size, no architecture kwargs
OPEN_CLIP_ABLE = [
    "model.image.name=test_vit",
    "model.image.image_size=160",
    "model.image.kwargs={}",
    "model.image.pool=null",
]


def _train(out: Path, data: Path, name: str, *overrides: str) -> Path:
    args = [*tiny_overrides(data, out, name), "train.report=false", "train.steps=4", *overrides]
    assert main(["train", "-c", TINY, *args]) == 0
    return out / name


def _test_images(data: Path, n: int | None = None) -> tuple[list[Image.Image], list[int]]:
    """Held-out PIL images and labels straight from the shards (no mm-ptft code in between)."""
    import io

    images, labels = [], []
    for shard in sorted((data / "test").glob("shard-*.tar")):
        for _, files in iter_tar_samples(shard):
            images.append(Image.open(io.BytesIO(files["png"])).convert("RGB"))
            labels.append(json.loads(files["json"])["label"])
    return images[:n], labels[:n]


def _export(source: Path, out: Path, *args: str) -> dict:
    assert main(["export", str(source), "--out", str(out), *args]) == 0
    return json.loads((out / "export.json").read_text())


def _no_leftovers(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".partial-{out.name}")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fmnist_tiny) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("export-runs")
    return {
        "vit": _train(out, fmnist_tiny, "vit"),  # the Fashion-MNIST recipe's tiny twin (28 px, patch 7)
        "oc": _train(out, fmnist_tiny, "oc", *OPEN_CLIP_ABLE),
    }


@pytest.fixture(scope="module")
def vit_export(runs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vit-export") / "export"
    manifest = _export(runs["vit"], out)  # --to all: timm, transformers, onnx; open_clip skipped with the reason
    assert sorted(manifest["targets"]) == ["onnx", "timm", "transformers"]
    assert "img_size" in manifest["skipped"]["open_clip"]
    return out


@pytest.fixture(scope="module")
def trained(runs):
    cfg, task = load_trained(runs["vit"])
    return cfg, task.model


@pytest.fixture(scope="module")
def model(trained):
    return trained[1]


# ------------------------------------------------------------------------------------------------------------- timm
def test_timm_round_trip_and_fine_tune(vit_export, model, fmnist_tiny):
    import timm
    from timm.data import create_transform, resolve_data_config

    directory = vit_export / "timm"
    config = json.loads((directory / "config.json").read_text())
    # 1) the hub-style local dir, 2) the architecture + overlay form, as a feature extractor
    by_dir = timm.create_model(f"local-dir:{directory}", pretrained=True).eval()
    overlay = dict(config["pretrained_cfg"], file=str(directory / "model.safetensors"))
    by_name = timm.create_model(
        config["architecture"], pretrained=True, pretrained_cfg_overlay=overlay, num_classes=0, **config["model_args"]
    ).eval()
    images, labels = _test_images(fmnist_tiny, 16)
    # timm's own preprocessing from the exported pretrained_cfg reproduces mm-ptft's evaluation transform
    transform = create_transform(**resolve_data_config({}, model=by_dir))
    x = torch.stack([transform(im) for im in images])
    with torch.no_grad():
        ours = model.image.forward_pooled(x)
        assert (by_dir(x) - ours).abs().max() < 1e-5
        assert (by_name(x) - ours).abs().max() < 1e-5
        projection = torch.nn.Linear(ours.shape[1], model.cfg.embed_dim, bias=False)
        from safetensors.torch import load_file

        projection.load_state_dict(load_file(str(directory / "projection.safetensors")))
        assert (F.normalize(projection(by_dir(x)), dim=-1) - model.encode_image(x)).abs().max() < 1e-5

    # a new 10-class head, fine-tuned in plain timm / torch code: the loss falls and the backbone moves
    classifier = timm.create_model(
        config["architecture"],
        pretrained=True,
        pretrained_cfg_overlay=overlay,
        **{**config["model_args"], "num_classes": 10},
    )
    assert classifier.get_classifier().out_features == 10
    before = {k: v.clone() for k, v in classifier.state_dict().items() if not k.startswith("head")}
    y = torch.tensor(labels)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=3e-3)
    classifier.train()
    losses = []
    for _ in range(5):
        loss = F.cross_entropy(classifier(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert any(not torch.equal(before[k], v) for k, v in classifier.state_dict().items() if k in before)


# ----------------------------------------------------------------------------------------------------- transformers
def test_transformers_round_trip(vit_export, model):
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    directory = vit_export / "transformers"
    encoder = AutoModel.from_pretrained(directory, add_pooling_layer=False).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    head = json.loads((directory / "mm_ptft_text.json").read_text())
    texts = ["a photo of the ankle boot.", "a grayscale image of the bag.", "trouser"]
    tokens = tokenizer(
        texts, padding="max_length", truncation=True, max_length=head["context_length"], return_tensors="pt"
    )
    projection = torch.nn.Linear(head["width"], head["embed_dim"], bias=head["proj_bias"])
    projection.load_state_dict(load_file(str(directory / "projection.safetensors")))
    with torch.no_grad():
        states = encoder(**tokens).last_hidden_state  # (B, L, width)
        if head["pool"] == "cls":
            pooled = states[:, 0]
        else:
            assert head["pool"] == "mean"
            mask = tokens["attention_mask"][..., None].float()
            pooled = (states * mask).sum(1) / mask.sum(1)
        ours = model.text.forward_pooled(tokens["input_ids"], tokens["attention_mask"])
        assert (pooled - ours).abs().max() < 1e-5
        theirs = projection(pooled)
        assert (
            theirs - model.encode_text(tokens["input_ids"], tokens["attention_mask"], normalize=False)
        ).abs().max() < 1e-5


# -------------------------------------------------------------------------------------------------------------- onnx
def test_onnx_dynamic_batch_matches(vit_export, trained, fmnist_tiny):
    import onnxruntime as ort

    from mm_ptft.data import create_transform

    cfg, model = trained
    session = ort.InferenceSession(str(vit_export / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    spec = json.loads((vit_export / "onnx" / "config.json").read_text())
    size = spec["input"]["shape"][-1]
    transform = create_transform(cfg.data.image, size, cfg.model.image.in_chans, spec["mean"], spec["std"], train=False)
    images, _ = _test_images(fmnist_tiny, 7)
    for batch in (1, 7):
        x = torch.stack([transform(im) for im in images[:batch]])
        features, embedding = session.run(["features", "embedding"], {"image": x.numpy()})
        assert features.shape == (batch, model.image.width)
        with torch.no_grad():
            assert (torch.from_numpy(features) - model.image.forward_pooled(x)).abs().max() < 1e-4
            assert (torch.from_numpy(embedding) - model.encode_image(x)).abs().max() < 1e-4


# ------------------------------------------------------------------------------------------------------ open_clip
def test_open_clip_round_trip_and_zero_shot(runs, tmp_path, fmnist_tiny):
    import open_clip

    out = tmp_path / "oc-export"
    _export(runs["oc"], out, "--to", "open_clip")
    oc_model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out / 'open_clip'}")
    oc_tokenizer = open_clip.get_tokenizer(f"local-dir:{out / 'open_clip'}")
    oc_model.eval()
    cfg, task = load_trained(runs["oc"])
    model = task.model
    from mm_ptft.models import create_tokenizer, tokenize

    tokenizer = create_tokenizer(cfg.model.text)
    meta = json.loads((fmnist_tiny / "dataset.json").read_text())
    classnames, templates = meta["classnames"], meta["templates"]
    images, labels = _test_images(fmnist_tiny)
    texts = [t.format(c) for c in classnames[:3] for t in templates[:2]]
    tokens = tokenize(tokenizer, texts, cfg.model.text.context_length)
    x = torch.stack([preprocess(im) for im in images[:8]])
    with torch.no_grad():
        assert (oc_model.encode_image(x) - model.encode_image(x, normalize=False)).abs().max() < 1e-5
        ids = oc_tokenizer(texts)
        assert torch.equal(ids, tokens["input_ids"])
        assert (oc_model.encode_text(ids) - model.encode_text(**tokens, normalize=False)).abs().max() < 1e-5

    # open_clip's zero-shot classifier + preprocessing over the held-out shards vs `mm-ptft eval`
    with torch.no_grad():
        classifier = open_clip.build_zero_shot_classifier(
            oc_model, oc_tokenizer, classnames, templates, num_classes_per_batch=10, device="cpu"
        )
        predictions = []
        for start in range(0, len(images), 200):
            batch = torch.stack([preprocess(im) for im in images[start : start + 200]])
            predictions.append((oc_model.encode_image(batch, normalize=True) @ classifier).argmax(1))
    predictions = torch.cat(predictions)
    results = tmp_path / "eval.json"
    overrides = [f"eval.data={fmnist_tiny}", "eval.max_samples=null", "eval.evaluators=[zeroshot]"]
    assert main(["eval", "--model", str(runs["oc"]), "--out", str(results), *overrides]) == 0
    metrics = json.loads(results.read_text())["metrics"]
    assert metrics["zeroshot/n"] == len(images)
    acc1 = (predictions == torch.tensor(labels)).float().mean().item()
    assert acc1 == pytest.approx(metrics["zeroshot/acc1"], abs=1e-6)
    # per image, too: mm-ptft's own classifier and transform give the same predictions
    from mm_ptft.data import create_transform
    from mm_ptft.data.stats import image_norm_stats
    from mm_ptft.models.zeroshot import zeroshot_classifier

    ours_clf = zeroshot_classifier(
        model, lambda t: tokenize(tokenizer, t, 16), classnames, templates, torch.device("cpu")
    )
    mean, std = image_norm_stats(cfg)
    transform = create_transform(cfg.data.image, 160, 3, mean, std, train=False)
    with torch.no_grad():
        ours = torch.cat(
            [
                (model.encode_image(torch.stack([transform(im) for im in images[s : s + 200]])) @ ours_clf).argmax(1)
                for s in range(0, len(images), 200)
            ]
        )
    assert torch.equal(ours, predictions)


def test_a_moved_open_clip_export_needs_only_relocate(runs, tmp_path):
    """open_clip resolves the HF text path of its config against the working directory, so an export records the
    absolute path it was written to. Moving it breaks plain open_clip until ``relocate`` re-points that one field;
    mm-ptft's own reader (``load_exported``) works wherever the directory is."""
    import open_clip

    from mm_ptft.export.to_open_clip import load_exported, relocate

    out = tmp_path / "written-here"
    _export(runs["oc"], out, "--to", "open_clip")
    moved = tmp_path / "elsewhere" / "oc"
    shutil.copytree(out / "open_clip", moved)
    shutil.rmtree(out)
    with pytest.raises(OSError):  # transformers cannot find the recorded (now removed) text tower directory
        open_clip.create_model_and_transforms(f"local-dir:{moved}")
    _, task = load_trained(runs["oc"])
    x = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(0))
    want = task.model.encode_image(x, normalize=False).detach()
    ours, _, _ = load_exported(moved)
    relocate(moved)
    assert json.loads((moved / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]["hf_model_name"] == str(
        moved
    )
    plain, _, _ = open_clip.create_model_and_transforms(f"local-dir:{moved}")
    with torch.no_grad():
        for model in (ours, plain):
            assert (model.eval().encode_image(x) - want).abs().max() < 1e-5


# ------------------------------------------------------------------------------------------------- CLIP_benchmark
def test_clip_benchmark_matches_mm_ptft_eval(runs, tmp_path, fmnist_tiny, monkeypatch):
    """The real clip-benchmark CLI on the Fashion-MNIST recipe's architecture (which open_clip cannot represent)."""
    cb_root = tmp_path / "fmnist-cb"
    assert main(["data", "clip-benchmark", "--src", str(fmnist_tiny), "--out", str(cb_root)]) == 0
    assert (cb_root / "test" / "nshards.txt").read_text().strip() == "1"
    assert "{c}" in (cb_root / "zeroshot_classification_templates.txt").read_text()
    monkeypatch.chdir(tmp_path)
    result = tmp_path / "cb.json"
    args = ["eval", "--model", str(runs["vit"]), "--pretrained", "tiny", "--dataset", "wds/fmnist"]
    args += ["--dataset_root", str(cb_root), "--task", "zeroshot_classification", "--no_amp", "--num_workers", "0"]
    assert main(["clip-benchmark", *args, "--batch_size", "200", "--output", str(result), "--quiet"]) == 0
    cb = json.loads(result.read_text())["metrics"]
    eval_out = tmp_path / "eval.json"
    overrides = [f"eval.data={fmnist_tiny}", "eval.max_samples=null", "eval.evaluators=[zeroshot]"]
    assert main(["eval", "--model", str(runs["vit"]), "--out", str(eval_out), *overrides]) == 0
    ours = json.loads(eval_out.read_text())["metrics"]
    assert ours["zeroshot/n"] == 600
    assert abs(cb["acc1"] - ours["zeroshot/acc1"]) <= 0.002
    assert abs(cb["mean_per_class_recall"] - ours["zeroshot/mean_per_class_recall"]) <= 0.002


# ----------------------------------------------------------------------------------------------- ZeRO-3 vs ZeRO-0
def _without_source(d: dict) -> dict:
    return {k: _without_source(v) if isinstance(v, dict) else v for k, v in d.items() if k != "source"}


def test_zero3_checkpoint_exports_as_zero0(tmp_path, fmnist_tiny):
    """The same initial weights saved through a ZeRO-0 and a ZeRO-3 engine (fp32) export to identical files."""
    from safetensors.torch import load_file

    from mm_ptft.config import load_config
    from mm_ptft.train.trainer import Trainer

    exports = {}
    for stage in (0, 3):
        name = f"zero{stage}"
        overrides = [*tiny_overrides(fmnist_tiny, tmp_path, name), f"deepspeed.zero_stage={stage}"]
        cfg = load_config(TINY, [*overrides, "deepspeed.precision=fp32", "train.report=false"])
        tag_dir = Trainer(cfg).save()
        assert (stage == 3) == any("zero_pp_rank" in p.name for p in tag_dir.iterdir())
        exports[stage] = tmp_path / f"export-{name}"
        _export(tag_dir, exports[stage], "--to", "timm", "transformers", "--no-verify")
    files = sorted(p.relative_to(exports[0]) for p in exports[0].rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(exports[3]) for p in exports[3].rglob("*") if p.is_file())
    for rel in files:
        a, b = exports[0] / rel, exports[3] / rel
        if rel.suffix == ".safetensors":
            sa, sb = load_file(str(a)), load_file(str(b))
            assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), rel
        elif rel.name in ("export.json", "mm_ptft_text.json") or rel.parent.name == "timm":
            assert _without_source(json.loads(a.read_text())) == _without_source(json.loads(b.read_text())), rel
        else:
            assert a.read_bytes() == b.read_bytes(), rel


# ------------------------------------------------------------------------------------------ fine-tuning checkpoint
def test_fine_tuned_image_tower_exports_what_it_holds(runs, vit_export, tmp_path, capsys):
    """A classifier checkpoint (``image.*`` + ``head.*``, as mm_ptft.finetune saves) gives timm and ONNX only."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(runs["vit"] / "model.safetensors"))
    fine_tuned = {k: v for k, v in state.items() if k.startswith("image.")}
    fine_tuned.update({"head.weight": torch.randn(10, 32), "head.bias": torch.zeros(10)})
    source = tmp_path / "ft"
    source.mkdir()
    save_file(fine_tuned, str(source / "model.safetensors"))
    shutil.copy(runs["vit"] / "config.yaml", source / "config.yaml")
    manifest = _export(source / "model.safetensors", tmp_path / "out", "--to", "all", "--no-verify")
    assert sorted(manifest["targets"]) == ["onnx", "timm"]
    assert sorted(manifest["skipped"]) == ["open_clip", "transformers"]
    ours, reference = (
        load_file(str(tmp_path / "out/timm/model.safetensors")),
        load_file(str(vit_export / "timm/model.safetensors")),
    )
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in ours)
    _fails(
        capsys, ["export", str(source), "--out", str(tmp_path / "t"), "--to", "transformers"], "only the image tower"
    )
    _no_leftovers(tmp_path / "t")


# ----------------------------------------------------------------------------------------------------- bad input
def _fails(capsys, argv: list[str], *expected: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for text in expected:
        assert text in err, err
    return err


def test_bad_inputs_are_one_line_and_leave_nothing(runs, tmp_path, capsys):
    out = tmp_path / "out"
    run = runs["vit"]
    _fails(capsys, ["export", str(tmp_path / "nope"), "--out", str(out)], "does not exist")
    _no_leftovers(out)
    _fails(capsys, ["export", str(run), "--out", str(out), "--to", "tflite"], "unknown target 'tflite'", "onnx")
    _no_leftovers(out)

    # a truncated safetensors file, and a truncated DeepSpeed checkpoint
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copy(run / "config.yaml", cut / "config.yaml")
    data = (run / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    _fails(capsys, ["export", str(cut / "model.safetensors"), "--out", str(out)], "checkpoint:", "cannot read")
    _no_leftovers(out)
    tag = next(p for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
    shutil.copytree(tag, cut / tag.name)
    states = cut / tag.name / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:2000])
    _fails(capsys, ["export", str(cut / tag.name), "--out", str(out)], "checkpoint:")
    _no_leftovers(out)

    # weights of one architecture with the config of another
    other = runs["oc"] / "config.yaml"
    _fails(capsys, ["export", str(run / "model.safetensors"), "--out", str(out), "-c", str(other)], "does not fit")
    _no_leftovers(out)

    # a target the model cannot give fails after another was written: still nothing at `out`
    _fails(
        capsys,
        ["export", str(run), "--out", str(out), "--to", "timm", "open_clip"],
        "open_clip cannot represent",
        "fc_norm",
    )
    _no_leftovers(out)

    # an existing output is kept unless --overwrite
    out.mkdir()
    (out / "keep").write_text("x")
    _fails(capsys, ["export", str(run), "--out", str(out), "--to", "timm"], "already exists")
    assert (out / "keep").read_text() == "x"
