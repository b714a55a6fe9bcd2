"""Text classification: the text/fortunes shard writers, their one-line errors, and the pretrained MiniLM tower
beating a randomly initialised tower of the same shape on held-out fortunes (a fixed split)."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
from helpers import tiny_overrides

import data_tools
from mm_ptft.cli import main
from mm_ptft.config import load_config

ROOT = Path(__file__).resolve().parents[2]
FORTUNES = Path("/usr/share/games/fortunes")
MINILM = str(ROOT / "configs" / "finetune" / "fortunes-minilm.yaml")
RANDOM = str(ROOT / "configs" / "finetune" / "fortunes-random.yaml")


def samples(data: Path, split: str) -> dict[str, dict]:
    """key → {"txt": str, "json": dict, other member names} of every shard of a split."""
    out: dict[str, dict] = {}
    for shard in sorted((data / split).glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                out.setdefault(key, {})[ext] = tar.extractfile(member).read().decode()
    for sample in out.values():
        sample["json"] = json.loads(sample["json"])
    return out


def test_text_writer_from_csv_and_jsonl(tmp_path):
    classes = tmp_path / "classes.txt"
    classes.write_text("sports\nweather\npolitics\n")
    rows = [("the match ended 2-1", "sports"), ("rain all week", "weather"), ("", "sports"), ("vote today", "politics")]
    src = tmp_path / "rows.csv"
    src.write_text("text,label\n" + "".join(f'"{t}",{label}\n' for t, label in rows))
    assert (
        data_tools.main(["text", "--src", str(src), "--out", str(tmp_path / "csv"), "--classnames", str(classes)]) == 0
    )
    got = samples(tmp_path / "csv", "train")
    assert len(got) == 3  # the empty text is skipped
    names = ["sports", "weather", "politics"]
    for sample in got.values():
        assert set(sample) == {"txt", "json"}  # no image member
        assert sample["json"]["class_name"] == names[sample["json"]["label"]]
        assert (sample["txt"], sample["json"]["class_name"]) in rows
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": t, "topic": i}) for t, i in [("a goal", 0), ("sunny", 1)]) + "\n")
    args = ["--text-col", "body", "--label-col", "topic", "--classnames", str(classes), "--split", "test"]
    assert data_tools.main(["text", "--src", str(jsonl), "--out", str(tmp_path / "csv"), *args]) == 0
    assert {s["txt"]: s["json"]["class_name"] for s in samples(tmp_path / "csv", "test").values()} == {
        "a goal": "sports",
        "sunny": "weather",
    }  # an int label indexes the class list
    assert json.loads((tmp_path / "csv" / "dataset.json").read_text())["classnames"] == names


def test_text_writer_errors_are_one_line(tmp_path, capsys):
    classes = tmp_path / "classes.txt"
    classes.write_text("sports\nweather\n")
    src = tmp_path / "rows.csv"
    src.write_text("text,label\nthe match,sports\nan election,politics\n")
    assert data_tools.main(["text", "--src", str(src), "--out", str(tmp_path / "o"), "--classnames", str(classes)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {src} row 2: label 'politics' is not in the class list (sports, weather)"
    classes.write_text("sports\nweather\nsports\n")
    assert data_tools.main(["text", "--src", str(src), "--out", str(tmp_path / "o"), "--classnames", str(classes)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: class-name file {classes}: duplicate class name 'sports' (entries 1 and 3)"


@pytest.fixture(scope="module")
def fortunes(tmp_path_factory) -> Path:
    if not FORTUNES.is_dir():
        pytest.skip("Debian package fortunes is not installed (apt-get install fortunes)")
    out = tmp_path_factory.mktemp("fortunes") / "fortunes"
    assert data_tools.main(["fortunes", "--out", str(out), "--max-per-topic", "150", "--shard-size", "200"]) == 0
    return out


def test_fortunes_split_is_fixed_and_disjoint(fortunes, tmp_path):
    again = tmp_path / "again"
    assert data_tools.main(["fortunes", "--out", str(again), "--max-per-topic", "150", "--shard-size", "50"]) == 0
    for split in ("train", "test"):
        a, b = samples(fortunes, split), samples(again, split)
        assert {k: v["txt"] for k, v in a.items()} == {k: v["txt"] for k, v in b.items()}  # same split, any sharding
    train, test = samples(fortunes, "train"), samples(fortunes, "test")
    assert not {s["txt"] for s in train.values()} & {s["txt"] for s in test.values()}
    topics = ["computers", "science", "food", "startrek"]
    assert json.loads((fortunes / "dataset.json").read_text())["classnames"] == topics
    for topic in topics:
        assert sum(s["json"]["class_name"] == topic for s in test.values()) == 30  # 20 % of 150
    quotes = (FORTUNES / "food").read_text(encoding="utf-8", errors="replace")
    food = [s["txt"] for s in test.values() if s["json"]["class_name"] == "food"]
    assert all(q in quotes for q in food)  # quotes come from their topic's file


def test_random_control_has_minilm_shape():
    from mm_ptft.models import TextTower

    pretrained, random = (TextTower(load_config(c).model.text, 384) for c in (MINILM, RANDOM))
    shapes = [{k: tuple(v.shape) for k, v in t.state_dict().items()} for t in (pretrained, random)]
    assert shapes[0] == shapes[1]


def test_pretrained_minilm_beats_random_init_on_held_out_quotes(fortunes, tmp_path):
    common = [
        *tiny_overrides(fortunes, tmp_path, "x"),
        "finetune.policy=linear-probe",
        "train.steps=25",
        "optim.lr=3e-3",
        "optim.warmup_steps=0",
        "eval.every=0",
        "model.text.context_length=48",
        "deepspeed.zero_stage=0",
        "deepspeed.precision=fp32",  # CPUs without AVX-512 bf16 run bf16 matrix products ~80x slower than fp32
        "train.report=false",
    ]
    recall = {}
    for name, config in (("minilm", MINILM), ("random", RANDOM)):
        assert main(["train", "-c", config, *common, f"train.name={name}"]) == 0
        summary = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()][-1]
        assert summary["classification/n"] == 120  # the fixed test split: 30 quotes of each of 4 topics
        recall[name] = summary["classification/mean_per_class_recall"]
    assert recall["minilm"] > 0.6  # chance is 0.25
    assert recall["minilm"] > recall["random"] + 0.2, recall
