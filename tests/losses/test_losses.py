"""Losses against naive O(N²) references, and the 2-rank gathered loss/gradients against the 1-rank full batch."""

import json
import math

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from mm_ptft.config import LossConfig
from mm_ptft.losses import create_loss


def naive_infonce(image, text, scale, bias=None):
    n = image.shape[0]
    total = 0.0
    for i in range(n):
        row = torch.stack([scale * image[i] @ text[j] + (bias or 0) for j in range(n)])
        col = torch.stack([scale * text[i] @ image[j] + (bias or 0) for j in range(n)])
        total = total - torch.log_softmax(row, 0)[i] - torch.log_softmax(col, 0)[i]
    return total / (2 * n)


def naive_siglip(image, text, scale, bias):
    n = image.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            total = total - F.logsigmoid(z * (scale * image[i] @ text[j] + bias))
    return total / n


def _feats(n=6, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    text = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    return image, text


def test_clip_loss_matches_naive():
    image, text = _feats()
    scale = torch.tensor(7.0)
    loss = create_loss(LossConfig(name="clip"))({"image_features": image, "text_features": text, "logit_scale": scale})
    torch.testing.assert_close(loss["loss"], naive_infonce(image, text, scale))


def test_siglip_loss_matches_naive():
    image, text = _feats(seed=1)
    scale, bias = torch.tensor(10.0), torch.tensor(-5.0)
    out = {"image_features": image, "text_features": text, "logit_scale": scale, "logit_bias": bias}
    loss = create_loss(LossConfig(name="siglip"))(out)
    torch.testing.assert_close(loss["loss"], naive_siglip(image, text, scale, bias))


def test_siglip_without_bias_is_a_clear_error():
    image, text = _feats()
    with pytest.raises(ValueError, match="logit bias"):
        create_loss(LossConfig(name="siglip"))(
            {"image_features": image, "text_features": text, "logit_scale": torch.tensor(1.0)}
        )


# ----------------------------------------------------------------------------------------------- 2 ranks vs 1 rank
N, D_IN, D = 8, 7, 4


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    x_image, x_text = torch.randn(N, D_IN, generator=g), torch.randn(N, D_IN, generator=g)
    w_image, w_text = torch.randn(D, D_IN, generator=g), torch.randn(D, D_IN, generator=g)
    return x_image, x_text, w_image, w_text


def _loss_and_grads(cfg, rank, world, rows):
    x_image, x_text, w_image, w_text = _setup()
    w_image, w_text = w_image.clone().requires_grad_(), w_text.clone().requires_grad_()
    log_scale = torch.tensor(math.log(10.0), requires_grad=True)
    bias = torch.tensor(-3.0, requires_grad=True)
    out = {
        "image_features": F.normalize(x_image[rows] @ w_image.T, dim=-1),
        "text_features": F.normalize(x_text[rows] @ w_text.T, dim=-1),
        "logit_scale": log_scale.exp(),
        "logit_bias": bias,
    }
    loss = create_loss(cfg, rank=rank, world_size=world)(out)["loss"]
    loss.backward()
    grads = [w_image.grad, w_text.grad, log_scale.grad, bias.grad if cfg.name == "siglip" else torch.zeros(())]
    return loss.detach(), grads


def _rank_main(rank, world, init_file, cfgs, result_file):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    rows = slice(rank * N // world, (rank + 1) * N // world)
    results = []
    for cfg in cfgs:
        loss, grads = _loss_and_grads(LossConfig(**cfg), rank, world, rows)
        # what DeepSpeed / DDP do: average loss for logging and gradients over data-parallel ranks
        dist.all_reduce(loss)
        for g in grads:
            dist.all_reduce(g)
        results.append({"loss": (loss / world).item(), "grads": [(g / world).flatten().tolist() for g in grads]})
    if rank == 0:
        with open(result_file, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


@pytest.mark.dist
def test_two_rank_loss_and_gradients_equal_one_rank_full_batch(tmp_path):
    cfgs = [
        {"name": "clip", "gather_with_grad": True, "local_loss": False},
        {"name": "clip", "gather_with_grad": True, "local_loss": True},
        {"name": "siglip"},
    ]
    result_file = tmp_path / "result.json"
    mp.spawn(_rank_main, args=(2, str(tmp_path / "init"), cfgs, str(result_file)), nprocs=2, join=True)
    two = json.loads(result_file.read_text())
    for cfg, got in zip(cfgs, two):
        loss, grads = _loss_and_grads(LossConfig(**cfg), 0, 1, slice(None))
        assert got["loss"] == pytest.approx(loss.item(), rel=1e-5), cfg
        for g_two, g_one in zip(got["grads"], grads):
            torch.testing.assert_close(torch.tensor(g_two), g_one.flatten(), atol=1e-6, rtol=1e-4, msg=str(cfg))


# ---------------------------------------------------------------------------------------------------------------------
# feature_gradients: the loss of cached accumulation, computed in row blocks, against open_clip's one-batch loss
# ---------------------------------------------------------------------------------------------------------------------


def _reference(cfg, image, text, scale, bias):
    """open_clip's loss (through ours) on one device, and autograd's gradient of every input."""
    leaves = [t.clone().requires_grad_() for t in (image, text, scale)] + (
        [bias.clone().requires_grad_()] if bias is not None else []
    )
    out = {"image_features": leaves[0], "text_features": leaves[1], "logit_scale": leaves[2]}
    if bias is not None:
        out["logit_bias"] = leaves[3]
    loss = create_loss(cfg)(out)["loss"]
    loss.backward()
    return loss.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize(
    "name,local_loss,with_bias",
    [("clip", False, False), ("clip", True, False), ("clip", False, True), ("siglip", False, True)],
)
@pytest.mark.parametrize("block_elements", [1, 37, 2**22, None])  # one row per block, ragged, one block, default
def test_feature_gradients_equal_the_one_batch_loss_and_gradients(name, local_loss, with_bias, block_elements):
    from mm_ptft.losses import feature_gradients

    image, text = _feats(n=12, d=8, seed=3)
    scale = torch.tensor(9.0)
    bias = torch.tensor(-4.0) if with_bias else None
    cfg = LossConfig(name=name, local_loss=local_loss)
    ref_loss, ref_grads = _reference(cfg, image, text, scale, bias)
    loss, grads = feature_gradients(create_loss(cfg), image, text, scale, bias, slice(0, 12), block_elements)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    keys = ["image_features", "text_features", "logit_scale"] + (["logit_bias"] if with_bias else [])
    for key, ref in zip(keys, ref_grads):
        torch.testing.assert_close(grads[key].reshape(ref.shape), ref, rtol=1e-5, atol=1e-6, msg=key)
    if not with_bias:
        assert grads["logit_bias"] is None


class _AutogradOnly(torch.nn.Module):
    """A loss that takes part in cached accumulation by ``rows_loss`` alone (no closed-form ``rows_grad``)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.grad_reduction = inner.grad_reduction

    def rows(self, own, total):
        return self.inner.rows(own, total)

    def rows_loss(self, *args):
        return self.inner.rows_loss(*args)


@pytest.mark.parametrize(
    "name,local_loss,with_bias",
    [("clip", False, False), ("clip", True, False), ("clip", False, True), ("siglip", False, True)],
)
def test_closed_form_block_gradients_equal_autograd_of_rows_loss(name, local_loss, with_bias):
    """``rows_grad`` (in place, no autograd) against autograd of the same blocks of ``rows_loss``, ragged blocks."""
    from mm_ptft.losses import feature_gradients

    image, text = _feats(n=23, d=6, seed=7)
    scale, bias = torch.tensor(7.0), torch.tensor(-3.0) if with_bias else None
    loss_fn = create_loss(LossConfig(name=name, local_loss=local_loss))
    assert hasattr(loss_fn, "rows_grad")
    own = slice(5, 17)
    closed = feature_gradients(loss_fn, image, text, scale, bias, own, block_elements=3 * 23)
    auto = feature_gradients(_AutogradOnly(loss_fn), image, text, scale, bias, own, block_elements=3 * 23)
    torch.testing.assert_close(closed[0], auto[0], rtol=1e-6, atol=1e-6)
    for key, ref in auto[1].items():
        if ref is None:
            assert closed[1][key] is None
        else:
            torch.testing.assert_close(closed[1][key], ref, rtol=1e-5, atol=1e-7, msg=key)


def test_feature_gradients_of_a_local_loss_cover_only_own_rows():
    """Rank 1 of 2 with a local loss: its rows' share, i.e. half the sum over the two ranks' local losses."""
    from mm_ptft.losses import feature_gradients

    image, text = _feats(n=8, d=4, seed=5)
    scale = torch.tensor(5.0)
    loss_fn = create_loss(LossConfig(name="clip", local_loss=True))
    parts = [feature_gradients(loss_fn, image, text, scale, None, own) for own in (slice(0, 4), slice(4, 8))]
    full, full_grads = _reference(LossConfig(name="clip"), image, text, scale, None)
    torch.testing.assert_close((parts[0][0] + parts[1][0]) / 2, full)  # mean of the ranks' losses = the global loss
    summed = (parts[0][1]["image_features"] + parts[1][1]["image_features"]) / 2
    torch.testing.assert_close(summed, full_grads[0])
