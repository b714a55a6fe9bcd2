"""``mm-ptft eval``: zero-shot, retrieval and linear-probe metrics against sklearn / numpy on independently computed
features (shards read with tarfile + PIL, preprocessing in numpy), the CLIP_benchmark result layout, bad input."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from braceexpand import braceexpand
from helpers import FT_TINY
from PIL import Image

from mm_ptft.checkpoint import load_weights
from mm_ptft.cli import main
from mm_ptft.config import load_config
from mm_ptft.eval.probe import fit_logistic_regression
from mm_ptft.models import create_model

N = 200


def read_split(data: Path, split: str, n: int) -> list[dict]:
    """The first n samples of a split in shard order: {"image": PIL, "caption", "label"}."""
    meta = json.loads((data / "dataset.json").read_text())
    samples: dict[str, dict] = {}
    for url in braceexpand(str(data / meta["splits"][split]["pattern"])):
        with tarfile.open(url) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
        if len(samples) >= n:
            break
    out = []
    for raw in list(samples.values())[:n]:
        image = Image.open(io.BytesIO(raw["png"])).convert("RGB")
        out.append({"image": image, "caption": raw["txt"].decode(), "label": json.loads(raw["json"])["label"]})
    return out


def encode(model, cfg, samples: list[dict], data: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(image features, caption features, labels, zero-shot class embeddings), normalised, computed without
    mm_ptft's data, tokenizer or zero-shot code."""
    from transformers import AutoTokenizer

    from mm_ptft.models.text_tower import resolve_local_path

    mean, std = np.array(cfg.data.image.mean), np.array(cfg.data.image.std)
    pixels = np.stack([(np.asarray(s["image"], dtype=np.float64) / 255.0 - mean) / std for s in samples])
    images = torch.from_numpy(pixels.transpose(0, 3, 1, 2)).float()  # (N, 3, 28, 28): 28 px needs no resize
    tokenizer = AutoTokenizer.from_pretrained(resolve_local_path(cfg.model.text.tokenizer))
    length = cfg.model.text.context_length

    def text_features(texts: list[str]) -> np.ndarray:
        tokens = tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
        return model.encode_text(tokens["input_ids"], tokens["attention_mask"]).numpy().astype(np.float64)

    meta = json.loads((data / "dataset.json").read_text())
    captions = [s["caption"] for s in samples]
    unique = sorted(set(captions))
    with torch.no_grad():
        image_f = model.encode_image(images).numpy().astype(np.float64)
        by_caption = dict(zip(unique, text_features(unique)))  # equal captions get equal features by construction
        class_f = []
        for name in meta["classnames"]:
            e = text_features([t.replace("{}", name) for t in meta["templates"]]).mean(0)
            class_f.append(e / np.linalg.norm(e))
    text_f = np.stack([by_caption[c] for c in captions])
    return image_f, text_f, np.array([s["label"] for s in samples]), np.stack(class_f)


def expected_recall(queries: np.ndarray, keys: np.ndarray, k: int) -> float:
    """CLIP-style recall@k of paired rows, ties with the positive ordered at random (expectation), in numpy."""
    scores = queries @ keys.T
    positive = np.diag(scores)[:, None]
    ahead = (scores > positive + 1e-6).sum(1)
    ties = (np.abs(scores - positive) <= 1e-6).sum(1) - 1
    return float(np.clip((k - ahead) / (ties + 1), 0, 1).mean())


def test_eval_metrics_agree_with_sklearn_and_numpy(pretrained, fmnist_tiny, tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, top_k_accuracy_score

    out, cb = tmp_path / "eval.json", tmp_path / "clip_benchmark"
    evaluators = "eval.evaluators=[zeroshot,retrieval,linear_probe]"
    args = [f"eval.data={fmnist_tiny}", f"eval.max_samples={N}", f"eval.batch_size={N}", evaluators]
    args.append(f"eval.settings.linear_probe.max_train_samples={N}")  # the probe's own setting: N train samples
    assert main(["eval", "--model", str(pretrained), "--out", str(out), "--out-dir", str(cb), *args]) == 0
    metrics = json.loads(out.read_text())["metrics"]

    cfg = load_config(pretrained / "config.yaml", [f"eval.data={fmnist_tiny}"])
    model = create_model(cfg.model)
    model.load_state_dict(load_weights(pretrained / "model.safetensors"))
    model.eval()
    image_f, text_f, labels, classes = encode(model, cfg, read_split(fmnist_tiny, "test", N), fmnist_tiny)

    logits = image_f @ classes.T
    assert metrics["zeroshot/acc1"] == pytest.approx(accuracy_score(labels, logits.argmax(1)), abs=1e-6)
    assert metrics["zeroshot/acc5"] == pytest.approx(top_k_accuracy_score(labels, logits, k=5, labels=range(10)))
    assert metrics["zeroshot/mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(labels, logits.argmax(1)))
    for k in (1, 5, 10):
        assert metrics[f"retrieval/text_retrieval_recall@{k}"] == pytest.approx(
            expected_recall(image_f, text_f, k), abs=1e-4
        )
        assert metrics[f"retrieval/image_retrieval_recall@{k}"] == pytest.approx(
            expected_recall(text_f, image_f, k), abs=1e-4
        )

    # linear probe: sklearn's LogisticRegression with the C the probe chose, on train-split features
    train_f, _, train_labels, _ = encode(model, cfg, read_split(fmnist_tiny, "train", N), fmnist_tiny)
    c = metrics["linear_probe/C"]
    reference = LogisticRegression(C=c, max_iter=10_000, tol=1e-10).fit(train_f, train_labels)
    assert metrics["linear_probe/lp_acc1"] == pytest.approx(reference.score(image_f, labels), abs=2 / N)
    assert metrics["linear_probe/n_train"] == N

    # the result files are CLIP_benchmark's: its own `build` tables them
    from clip_benchmark.cli import main_build

    main_build(Namespace(files=[str(cb)], output=str(tmp_path / "benchmark.csv")))
    rows = {r["task"]: r for r in csv.DictReader((tmp_path / "benchmark.csv").open())}
    assert set(rows) == {"zeroshot_classification", "zeroshot_retrieval", "linear_probe"}
    assert float(rows["zeroshot_classification"]["acc1"]) == pytest.approx(metrics["zeroshot/acc1"])
    assert float(rows["linear_probe"]["lp_acc1"]) == pytest.approx(metrics["linear_probe/lp_acc1"])
    assert rows["zeroshot_retrieval"]["dataset"] == "fashion-mnist"


def test_classification_and_flip_metrics_agree_with_sklearn(pretrained, fmnist_tiny, tmp_path):
    """`classification` and `classification_hflip` of a classifier (the zero-shot-headed fine-tune start, saved as
    a file) against sklearn on logits of numpy-preprocessed images and of their mirror images."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, log_loss, top_k_accuracy_score

    from mm_ptft.checkpoint import save_weights
    from mm_ptft.config import save_config
    from mm_ptft.tasks import create_task

    cfg = load_config(FT_TINY, [f"data.train={fmnist_tiny}", f"eval.data={fmnist_tiny}", f"finetune.init={pretrained}"])
    task = create_task(cfg).eval()
    save_weights(task.model.state_dict(), tmp_path / "model.safetensors")
    save_config(cfg, tmp_path / "config.yaml")
    out = tmp_path / "eval.json"
    args = [f"eval.max_samples={N}", "eval.batch_size=64", "eval.evaluators=[classification,classification_hflip]"]
    assert main(["eval", "--model", str(tmp_path / "model.safetensors"), "--out", str(out), *args]) == 0
    metrics = json.loads(out.read_text())["metrics"]

    samples = read_split(fmnist_tiny, "test", N)
    mean, std = np.array(cfg.data.image.mean), np.array(cfg.data.image.std)
    pixels = np.stack([(np.asarray(s["image"], dtype=np.float64) / 255.0 - mean) / std for s in samples])
    images = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))).float()
    mirrored = torch.from_numpy(np.ascontiguousarray(pixels[:, :, ::-1].transpose(0, 3, 1, 2))).float()
    labels = np.array([s["label"] for s in samples])
    with torch.no_grad():
        probs = task.model(images).double().softmax(-1).numpy()
        flip_probs = (probs + task.model(mirrored).double().softmax(-1).numpy()) / 2
    assert not np.array_equal(probs.argmax(1), flip_probs.argmax(1))  # the flips change some predictions
    for name, p in (("classification", probs), ("classification_hflip", flip_probs)):
        assert metrics[f"{name}/acc1"] == pytest.approx(accuracy_score(labels, p.argmax(1)), abs=1e-6), name
        assert metrics[f"{name}/acc5"] == pytest.approx(top_k_accuracy_score(labels, p, k=5, labels=range(10)))
        assert metrics[f"{name}/mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(labels, p.argmax(1)))
        assert metrics[f"{name}/loss"] == pytest.approx(log_loss(labels, p, labels=range(10)), rel=1e-4), name
        assert metrics[f"{name}/n"] == N


def test_logistic_regression_matches_sklearn():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 6))
    y = rng.integers(0, 4, size=300)
    x = centers[y] + rng.normal(scale=1.5, size=(300, 6))  # overlapping classes: the penalty matters
    for c in (0.01, 1.0, 100.0):
        w, b = fit_logistic_regression(torch.from_numpy(x), torch.from_numpy(y), 4, c)
        ref = LogisticRegression(C=c, max_iter=10_000, tol=1e-12).fit(x, y)
        # the softmax is invariant to a shift shared by all classes: compare centred parameters
        ours, theirs = w.numpy().T - w.numpy().T.mean(0), ref.coef_ - ref.coef_.mean(0)
        assert np.allclose(ours, theirs, atol=1e-4 * max(1.0, np.abs(theirs).max())), c
        assert np.allclose(b.numpy() - b.numpy().mean(), ref.intercept_ - ref.intercept_.mean(), atol=1e-3), c


def test_duplicate_class_name_file_in_eval_is_one_line(pretrained, fmnist_tiny, tmp_path, capsys):
    names = tmp_path / "classnames.txt"
    names.write_text("\n".join(["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "coat"]) + "\n")
    args = [f"eval.data={fmnist_tiny}", f"eval.classnames={names}", "eval.evaluators=[zeroshot]"]
    assert main(["eval", "--model", str(pretrained), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: config: duplicate class name 'coat' in eval.classnames ({names}) (entries 4 and 7)"
