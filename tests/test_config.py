from pathlib import Path

import pytest
import yaml

from mm_ptft.config import Config, ConfigError, config_to_dict, load_config, parse_override, save_config


def test_defaults_and_overrides_are_typed():
    cfg = load_config(
        None,
        [
            "model.text.config={model_type: bert}",
            "train.steps=200",
            "model.image.name=resnet18",
            "optim.lr=3e-4",
            "model.image.kwargs.drop_path_rate=0.1",
            "data.image.mean=[0.5,0.5,0.5]",
        ],
    )
    assert isinstance(cfg, Config)
    assert cfg.train.steps == 200 and cfg.model.image.name == "resnet18"
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.model.image.kwargs == {"drop_path_rate": 0.1}
    assert cfg.data.image.mean == [0.5, 0.5, 0.5]


def test_int_accepted_for_float_but_not_the_reverse():
    cfg = load_config(None, ["model.text.config={model_type: bert}", "optim.lr=1"])
    assert cfg.optim.lr == 1.0
    with pytest.raises(ConfigError, match=r"train.steps=1.5 has the wrong type \(expected int"):
        load_config(None, ["model.text.config={model_type: bert}", "train.steps=1.5"])


def test_unknown_key_names_key_and_valid_ones():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.stpes=3"])
    msg = str(e.value)
    assert "unknown key 'train.stpes'" in msg and "did you mean 'steps'" in msg and "save_every" in msg
    assert "\n" not in msg


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  image:\n    nmae: resnet18\n")
    with pytest.raises(ConfigError, match=r"unknown key 'model.image.nmae'.*did you mean 'name'"):
        load_config(path)


def test_literal_and_bool_checks():
    with pytest.raises(ConfigError, match="deepspeed.zero_stage=4 is not one of 0, 1, 2, 3"):
        load_config(None, ["model.text.config={model_type: bert}", "deepspeed.zero_stage=4"])
    with pytest.raises(ConfigError, match="expected true/false"):
        load_config(None, ["model.text.config={model_type: bert}", "train.progress=3"])


def test_cross_field_validation():
    from mm_ptft.tasks import configure_task

    with pytest.raises(ConfigError, match="model.text needs either"):  # the contrastive task's own check
        configure_task(load_config(None, []))
    configure_task(load_config(None, ["task=detection", "deepspeed.precision=fp32"]))  # no text tower to describe
    with pytest.raises(ConfigError, match="data.image.mean needs 1 values"):
        load_config(
            None, ["model.text.config={model_type: bert}", "model.image.in_chans=1", "data.image.mean=[0.1,0.2,0.3]"]
        )


def test_base_inheritance_and_name(tmp_path, tiny_config_path):
    cfg = load_config(tiny_config_path)
    assert cfg.train.name == "pretrain-fmnist-tiny"
    assert cfg.model.image.image_size == 28  # inherited from the full recipe
    assert cfg.model.embed_dim == 32  # overridden by the twin
    assert cfg.model.image.kwargs["depth"] == 2  # mappings merge key by key
    (tmp_path / "base.yaml").write_text("model: {text: {config: {model_type: modernbert, local_attention: 64}}}\n")
    (tmp_path / "same.yaml").write_text("base: base.yaml\nmodel: {text: {config: {model_type: modernbert}}}\n")
    (tmp_path / "other.yaml").write_text("base: base.yaml\nmodel: {text: {config: {model_type: bert}}}\n")
    assert load_config(tmp_path / "same.yaml").model.text.config["local_attention"] == 64
    assert load_config(tmp_path / "other.yaml").model.text.config == {"model_type": "bert"}  # another model: replaced
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "x.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "x.yaml")


def test_saved_config_round_trips(tmp_path, tiny_config_path):
    cfg = load_config(tiny_config_path, ["train.steps=7"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert config_to_dict(again) == config_to_dict(cfg)
    assert yaml.safe_load((tmp_path / "c.yaml").read_text())["train"]["steps"] == 7


def test_parse_override_values():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=null") == (["a"], None)
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    assert parse_override("a=runs/x") == (["a"], "runs/x")
    with pytest.raises(ConfigError, match="must look like"):
        parse_override("novalue")


def test_templates_with_braces_in_a_flow_list_are_read_as_strings():
    """YAML reads `{}` inside an unquoted flow list as a mapping (or fails); an override of templates means text."""
    _, value = parse_override("eval.templates=[a photo of a {}., a {} in the dark]")
    assert value == ["a photo of a {}.", "a {} in the dark"]
    _, value = parse_override("eval.templates=['a photo of a {}, seen from afar', \"a {}\"]")  # quoted: YAML's own
    assert value == ["a photo of a {}, seen from afar", "a {}"]
    cfg = load_config(None, ["model.text.config={model_type: bert}", "eval.templates=[a photo of a {}.]"])
    assert cfg.eval.templates == ["a photo of a {}."]


def test_a_run_config_holds_the_sections_its_task_reads(tiny_config_path):
    from mm_ptft.tasks import configure_task

    pretrain = config_to_dict(configure_task(load_config(tiny_config_path)))
    assert "loss" in pretrain and "finetune" not in pretrain and "detection" not in pretrain
    finetune_tiny = tiny_config_path.parent / "finetune" / "fmnist-full-tiny.yaml"
    finetune = config_to_dict(configure_task(load_config(finetune_tiny)))  # its base (a pretraining recipe) has loss
    assert "finetune" in finetune and "loss" not in finetune and "detection" not in finetune
    assert finetune["finetune"]["head_init"] == "zeroshot"
    detection = config_to_dict(configure_task(load_config(None, ["task=detection", "deepspeed.precision=fp32"])))
    assert detection["detection"]["head"] == "faster_rcnn" and "loss" not in detection and "finetune" not in detection


def test_every_shipped_config_loads():
    """Every recipe under configs/ resolves its `base:` chain and passes the typed schema (no stale keys); the search
    spaces under configs/sweep/ are not run configs (tests/finetune/test_sweep.py loads them against their recipes)."""
    from mm_ptft.tasks import configure_task

    root = Path(__file__).resolve().parents[1] / "configs"
    paths = sorted(p for p in root.rglob("*.yaml") if p.parent.name != "sweep")
    assert len(paths) >= 20
    for path in paths:
        cfg = configure_task(load_config(path))  # each task's own section checks too
        assert cfg.task in ("contrastive", "classification", "text-classification", "detection"), path
