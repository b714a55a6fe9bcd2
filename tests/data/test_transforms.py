"""Image transforms: the cheaper pipeline equals torchvision's, draws every random choice from the generator it is
given (never the global RNG), and random erasing behaves as timm's ``--reprob``."""

import pytest
import torch

from mm_ptft.data import create_transform


def _rng(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("source_mode", ["L", "RGB", "P", "RGBA"])
@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("train", [True, False])
def test_transform_equals_torchvision_reference(source_mode, in_chans, train):
    """The cheaper pipeline (grayscale kept one channel until the end, no ToTensor/Normalize) gives torchvision's
    ``convert → crop/resize → flip → ToTensor → Normalize`` to the last bit."""
    from PIL import Image
    from torchvision import transforms as T

    from mm_ptft.config import ImageTransformConfig

    g = torch.Generator().manual_seed(1)
    pixels = torch.randint(0, 256, (37, 30, 3), generator=g, dtype=torch.uint8).numpy()
    image = Image.fromarray(pixels, "RGB")
    image = image.convert(source_mode) if source_mode != "P" else image.quantize(64)
    cfg = ImageTransformConfig(train_scale=[0.5, 1.0], hflip=0.5)
    mean, std = [0.3, 0.4, 0.5][:in_chans], [0.2, 0.25, 0.3][:in_chans]
    mode = "L" if in_chans == 1 else "RGB"
    interp = T.InterpolationMode.BICUBIC
    geometry = (
        [
            T.RandomResizedCrop(24, scale=(0.5, 1.0), ratio=tuple(cfg.train_ratio), interpolation=interp),
            T.RandomHorizontalFlip(0.5),
        ]
        if train
        else [T.Resize(24, interpolation=interp), T.CenterCrop(24)]
    )
    reference = T.Compose([lambda im: im.convert(mode), *geometry, T.ToTensor(), T.Normalize(mean, std)])
    ours = create_transform(cfg, 24, in_chans, mean, std, train)
    for seed in range(8):
        torch.manual_seed(seed)
        want = reference(image)  # torchvision draws from the global RNG …
        torch.manual_seed(1234)
        before = torch.get_rng_state()
        got = ours(image, torch.Generator().manual_seed(seed))  # … ours the same draws from the generator it is given
        assert torch.equal(torch.get_rng_state(), before)  # and leaves the global RNG where it was
        assert got.shape == want.shape == (in_chans, 24, 24) and got.dtype == torch.float32
        assert torch.equal(got, want), (seed, (got - want).abs().max())


def test_random_erasing_replaces_one_rectangle_in_training_only():
    from PIL import Image

    from mm_ptft.config import ImageTransformConfig

    image = Image.fromarray((torch.arange(28 * 28) % 251).reshape(28, 28).to(torch.uint8).numpy())
    whole = {"train_scale": [1.0, 1.0], "train_ratio": [1.0, 1.0]}
    for train in (True, False):
        plain = create_transform(ImageTransformConfig(**whole), 28, 1, [0.5], [0.5], train)(image, _rng(0))
        erased = create_transform(ImageTransformConfig(**whole, re_prob=1.0), 28, 1, [0.5], [0.5], train)(
            image, _rng(0)
        )
        changed = (plain != erased)[0]
        if not train:
            assert not changed.any()  # evaluation never erases
            continue
        rows, cols = changed.any(dim=1).nonzero()[:, 0], changed.any(dim=0).nonzero()[:, 0]
        box = changed[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        # one rectangle of 2-33 % of the area (a noise pixel may equal the original by chance: allow a few)
        assert 0.02 * 28 * 28 <= box.numel() <= 0.34 * 28 * 28 and box.float().mean() > 0.95
        # filled with noise (timm's --reprob), not a constant
        region = erased[0, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert region.unique().numel() > region.numel() // 2


def test_random_erasing_equals_torchvision_with_the_same_draws():
    from torchvision import transforms as T

    from mm_ptft.data.transforms import RandomErasing

    x = torch.randn(3, 20, 16)
    for seed in range(6):
        torch.manual_seed(seed)
        want = T.RandomErasing(0.7, value="random")(x.clone())
        assert torch.equal(RandomErasing(0.7)(x.clone(), _rng(seed)), want), seed
