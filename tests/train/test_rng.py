"""The training process's own random stream (dropout, drop-path) belongs to the training process: with
``data.workers: 0`` the samples are decoded in it, and augmentation must draw from each sample's own generator."""

from __future__ import annotations

import pytest
import torch
from helpers import PRE_TINY, corrupt_image, member_names, recorded_keys, tiny_overrides

from mm_ptft.config import load_config
from mm_ptft.tasks import ContrastiveTask
from mm_ptft.train.trainer import Trainer


def _rng_at_each_forward(data, out, name, monkeypatch) -> list[torch.Tensor]:
    """The global RNG state at the start of every training forward of a 3-step, 1-process, workers=0 run."""
    states = []
    forward = ContrastiveTask.forward

    def recording(self, batch):
        if self.training:
            states.append(torch.get_rng_state())
        return forward(self, batch)

    monkeypatch.setattr(ContrastiveTask, "forward", recording)
    overrides = [*tiny_overrides(data, out, name), "data.workers=0", "train.steps=3", "train.record_keys=true"]
    overrides += ["deepspeed.precision=fp32", "data.image.hflip=0.5", "eval.data=null", "train.report=false"]
    Trainer(load_config(PRE_TINY, overrides)).train()
    monkeypatch.undo()
    return states


def test_dropout_noise_of_a_step_does_not_depend_on_the_samples_decoded(
    fmnist_tiny, fmnist_copy, tmp_path, monkeypatch
):
    # the same run on data where one image of every shard is undecodable: other samples fill the batches
    for shard in sorted((fmnist_copy / "train").glob("*.tar")):
        corrupt_image(shard, sorted({n.split(".")[0] for n in member_names(shard)})[3])
    clean = _rng_at_each_forward(fmnist_tiny, tmp_path, "clean", monkeypatch)
    damaged = _rng_at_each_forward(fmnist_copy, tmp_path, "damaged", monkeypatch)
    assert recorded_keys(tmp_path / "clean", 0) != recorded_keys(tmp_path / "damaged", 0)  # other samples decoded …
    assert len(clean) == len(damaged) == 3
    for step, (a, b) in enumerate(zip(clean, damaged, strict=True)):
        assert torch.equal(a, b), f"step {step}: the training RNG depends on which samples were decoded"
    # … and the stream's augmentation did not touch it: step 0 starts where the Trainer seeded it
    torch.manual_seed(load_config(PRE_TINY).train.seed + 1)  # Trainer: seed + 1 + rank
    assert torch.equal(clean[0], torch.get_rng_state())


@pytest.mark.parametrize("workers", [0, 2])
def test_augmentation_is_a_function_of_the_stream_position(fmnist_tiny, tmp_path, workers):
    """Two loaders from the same position give bit-identical augmented batches, whatever the global RNG holds."""
    from mm_ptft.config import DataConfig, ImageTransformConfig
    from mm_ptft.data import (
        Collator,
        DataPosition,
        SampleDecoder,
        TrainStream,
        create_transform,
        make_loader,
        resolve_shards,
    )

    shards = resolve_shards(str(fmnist_tiny), "train")
    transform = create_transform(ImageTransformConfig(train_scale=[0.3, 1.0], hflip=0.5, re_prob=0.5), 28, 1,
                                 [0.5], [0.5], train=True)  # fmt: skip
    cfg = DataConfig(batch_size=16, workers=workers)

    def first_batches(global_seed: int) -> list[torch.Tensor]:
        torch.manual_seed(global_seed)
        stream = TrainStream(shards, cfg, SampleDecoder(transform, ["png"], need_caption=False), Collator(None), 0, 0,
                             DataPosition(1, max(workers, 1)))  # fmt: skip
        it = iter(make_loader(stream, workers, 2))
        return [next(it)["image"] for _ in range(3)]

    a, b = first_batches(1), first_batches(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
