"""Checkpoint publishing, resume discovery and safe loading (no process group needed)."""

import json
import os
import pickle

import pytest
import torch

from mm_ptft import checkpoint as ckpt


def _fake_tag(ckpt_dir, tag, step):
    d = ckpt_dir / tag
    d.mkdir(parents=True)
    (d / ckpt.META).write_text(json.dumps({"step": step}))
    return d


def test_latest_moves_only_on_publish_and_partials_are_ignored(tmp_path):
    c = tmp_path / "checkpoints"
    _fake_tag(c, ".partial-step_00000010", 10)
    ckpt.publish(c, "step_00000010", keep_last=2)
    assert (c / "latest").read_text().strip() == "step_00000010"
    # a save killed midway: the partial dir exists, latest still names the old one
    part = c / ".partial-step_00000020"
    part.mkdir()
    (part / "mp_rank_00_model_states.pt").write_bytes(b"half")
    assert ckpt.resolve_resume(c, "latest") == c / "step_00000010"
    ckpt.clean_partials(c)
    assert not part.exists()


def test_resume_falls_back_to_newest_complete_and_prunes(tmp_path):
    c = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        _fake_tag(c, f".partial-{ckpt.tag_for(step)}", step)
        ckpt.publish(c, ckpt.tag_for(step), keep_last=2)
    assert sorted(p.name for p in ckpt.list_checkpoints(c)) == [ckpt.tag_for(2), ckpt.tag_for(3)]
    (c / "latest").write_text("step_99999999\n")  # marker naming a vanished checkpoint
    assert ckpt.resolve_resume(c, "latest") == c / ckpt.tag_for(3)
    assert ckpt.resolve_resume(tmp_path / "empty", "latest") is None
    with pytest.raises(ckpt.CheckpointError, match="not a complete checkpoint"):
        ckpt.resolve_resume(c, "step_00000001")


def test_on_a_shared_file_system_only_rank_0_publishes(tmp_path):
    """Two nodes over one file system: the other node's local rank 0 sees rank 0's meta.json in the partial (or the
    partial already renamed) and leaves publishing to rank 0, whichever of the two gets there first. Before, a node
    arriving between rank 0's rename and its own check deleted the checkpoint rank 0 had just put in place."""
    c = tmp_path / "checkpoints"
    tag = ckpt.tag_for(6)
    _fake_tag(c, f".partial-{tag}", 6)
    ckpt.publish(c, tag, keep_last=2, primary=False)  # the other node first: nothing moves
    assert (c / f".partial-{tag}" / ckpt.META).is_file() and not (c / tag).exists() and not (c / "latest").exists()
    ckpt.publish(c, tag, keep_last=2)
    ckpt.publish(c, tag, keep_last=2, primary=False)  # the other node after rank 0: the checkpoint stays
    assert ckpt.resolve_resume(c, "latest") == c / tag and ckpt.read_meta(c / tag)["step"] == 6

    # a node-local file system: the other node's partial holds only its own files, and it publishes them itself
    local = tmp_path / "node1" / "checkpoints"
    (local / f".partial-{tag}").mkdir(parents=True)
    (local / f".partial-{tag}" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"shard")
    ckpt.publish(local, tag, keep_last=2, primary=False)
    assert (local / tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()
    assert (local / "latest").read_text().strip() == tag


def test_atomic_write_leaves_no_temp_files(tmp_path):
    ckpt.atomic_write_text(tmp_path / "latest", "a\n")
    ckpt.atomic_write_text(tmp_path / "latest", "b\n")
    assert os.listdir(tmp_path) == ["latest"] and (tmp_path / "latest").read_text() == "b\n"


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/mm_ptft_pwned",))


def test_pickled_payload_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"w": torch.zeros(1)}, "x": Payload()}, f)
    with pytest.raises(ckpt.CheckpointError, match="refusing to load"):
        ckpt.load_weights(path)
    assert not os.path.exists("/tmp/mm_ptft_pwned")


def test_deepspeed_reader_refuses_payload(tmp_path):
    from mm_ptft.distributed.engine import UnsafeCheckpointError, safe_torch_load

    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.zeros(1)}, "evil": Payload()}, path)
    original = torch.load
    with pytest.raises(UnsafeCheckpointError, match="refusing to unpickle"), safe_torch_load():
        assert torch.load is not original  # DeepSpeed's own torch.load calls go through the weights-only reader
        torch.load(path)
    assert torch.load is original  # restored after the block, even though it raised
    assert not os.path.exists("/tmp/mm_ptft_pwned")
    torch.save({"module": {"w": torch.ones(2)}}, path)  # a plain state still loads inside the block
    with safe_torch_load():
        assert torch.equal(torch.load(path)["module"]["w"], torch.ones(2))


def test_weights_round_trip_and_mismatch_message(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    ckpt.save_weights(model.state_dict(), tmp_path / "m.safetensors")
    state = ckpt.load_weights(tmp_path / "m.safetensors")
    other = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    ckpt.load_model_weights(other, state)
    torch.testing.assert_close(other[1].weight, model[1].weight)
    wrong = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2))
    with pytest.raises(ckpt.CheckpointError, match=r"shape mismatches, e.g. 0.weight: \(4, 3\) vs \(5, 3\)"):
        ckpt.load_model_weights(wrong, state)
    (tmp_path / "trunc.safetensors").write_bytes((tmp_path / "m.safetensors").read_bytes()[:40])
    with pytest.raises(ckpt.CheckpointError, match="cannot read"):
        ckpt.load_weights(tmp_path / "trunc.safetensors")
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.load_weights(tmp_path / "missing.safetensors")


def test_architecture_check(tmp_path):
    d = tmp_path / "step_1"
    d.mkdir()
    (d / "config.yaml").write_text("model:\n  embed_dim: 128\n  image: {name: vit_tiny_patch16_224, lock: false}\n")
    ckpt.check_architecture(d, {"embed_dim": 128, "image": {"name": "vit_tiny_patch16_224", "lock": True}})
    with pytest.raises(ckpt.CheckpointError, match=r"another architecture \(model.embed_dim: 128 vs 64"):
        ckpt.check_architecture(d, {"embed_dim": 64, "image": {"name": "vit_tiny_patch16_224"}})
