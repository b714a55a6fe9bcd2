"""What fine-tuning changed in a tower (``mm-ptft diff``).

A and B are weights (run dir, checkpoint dir of any ZeRO stage, or .safetensors) that both hold the tower's
``image.*`` (or ``text.*``) weights: a pretraining dual encoder and a classifier fine-tuned from it, say. The tower
is built from A's saved config (or ``--config``). Reports, as ``diff.json`` and ``diff.png``:

* per layer group (embeddings, each block, final norm, projection): relative weight change ‖θ_B − θ_A‖ / ‖θ_A‖;
* per layer: linear CKA between A's and B's features of the same probe samples — image towers: each block's output
  tokens (timm ``forward_intermediates``), text towers: each layer's mask-averaged token states; then the pooled
  features and the projected embedding.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch

from mm_ptft.analysis.cka import linear_cka
from mm_ptft.analysis.drift import group_label, relative_change
from mm_ptft.config import Config, ConfigError


def build_tower(cfg: Config, kind: str) -> torch.nn.Module:
    from mm_ptft.models import ImageTower, TextTower

    if kind == "image":
        return ImageTower(cfg.model.image, cfg.model.embed_dim, fused_attn=False)
    return TextTower(cfg.model.text, cfg.model.embed_dim)


@torch.no_grad()
def layer_features(tower: torch.nn.Module, kind: str, batch: dict) -> list[torch.Tensor]:
    """Features of each layer of ``tower`` for one batch, input to output, each (B, …) float32."""
    if kind == "image":
        image = batch["image"].to(next(tower.parameters()).dtype)
        blocks = tower.trunk.forward_intermediates(image, intermediates_only=True)  # per block (B, C, H, W)
        pooled = tower.forward_pooled(image)
        return [b.float() for b in blocks] + [pooled.float(), tower.proj(pooled).float()]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    states = tower.transformer(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    weights = mask.unsqueeze(-1).float()  # (B, L, 1): padding does not count
    means = [(s.float() * weights).sum(1) / weights.sum(1).clamp(min=1) for s in states]
    pooled = tower.pool(states[-1], mask)
    return means + [pooled.float(), tower.proj(pooled).float()]


def layer_names(tower: torch.nn.Module, kind: str, count: int) -> list[str]:
    if kind == "image":
        # timm's feature_info names what forward_intermediates returns: ViT blocks, or a CNN's stem and stages
        info = [f["module"] for f in getattr(tower.trunk, "feature_info", [])]
        inner = info if len(info) == count - 2 else [f"blocks.{i}" for i in range(count - 2)]
    else:
        inner = ["embeddings"] + [f"layer.{i}" for i in range(count - 3)]
    return [*inner, "pooled", "embedding"]


def probe_batches(cfg: Config, kind: str, probe: str, split: str, max_samples: int, batch_size: int = 100):
    """Decoded probe batches (the evaluation transform / tokenizer of the tower's config), one process, through the
    same preparation as every evaluation (:func:`mm_ptft.eval.plan_eval`)."""
    from mm_ptft.data import ImageTextSamples
    from mm_ptft.eval import plan_eval
    from mm_ptft.models import Tokenize

    probe_cfg = copy.deepcopy(cfg)
    probe_cfg.eval = dataclasses.replace(
        cfg.eval, data=probe, split=split, max_samples=max_samples, batch_size=batch_size, evaluators=[], settings={}
    )
    probe_cfg.data.workers = 0
    samples = ImageTextSamples(need_image=kind == "image", need_caption=kind == "text")
    tokenize = Tokenize.create(cfg.model.text) if kind == "text" else None
    ctx = plan_eval(probe_cfg).context(None, tokenize=tokenize, samples=samples)
    for batch, _ in ctx.iterate():
        yield batch


def diff_towers(
    a: str, b: str, probe: str, cfg: Config, kind: str = "image", split: str = "test", max_samples: int = 500
) -> dict:
    """Weight change per layer group and CKA per layer between the ``kind`` towers of weights ``a`` and ``b``."""
    from mm_ptft.finetune.init import load_tower

    towers = []
    for source in (a, b):
        tower = build_tower(cfg, kind)
        load_tower(tower, source, f"{kind}.")
        towers.append(tower.eval())
    state_a, state_b = (t.state_dict() for t in towers)
    groups = towers[0].layer_groups()
    change = relative_change(state_a, state_b, groups)
    feats: list[list[list[torch.Tensor]]] = [[], []]  # [tower][layer][batch]
    n = 0
    for batch in probe_batches(cfg, kind, probe, split, max_samples):
        n += next(iter(v for v in batch.values() if torch.is_tensor(v))).shape[0]
        for i, tower in enumerate(towers):
            for j, f in enumerate(layer_features(tower, kind, batch)):
                if len(feats[i]) <= j:
                    feats[i].append([])
                feats[i][j].append(f)
    if n < 2:
        raise ConfigError(f"config: the probe set {probe} ({split}) has {n} samples; CKA needs at least 2")
    names = layer_names(towers[0], kind, len(feats[0]))
    cka = [
        {"layer": name, "cka": linear_cka(torch.cat(fa), torch.cat(fb))}
        for name, fa, fb in zip(names, feats[0], feats[1])
    ]
    return {
        "a": str(a),
        "b": str(b),
        "tower": kind,
        "probe": str(probe),
        "probe_split": split,
        "probe_samples": n,
        "weight_change": change,
        "cka": cka,
        "groups": [group_label(g, i, len(groups)) for i, g in enumerate(groups)],
    }


def plot_diff(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    rows = result["weight_change"]
    ax1.bar(range(len(rows)), [r["relative_change"] for r in rows], color="tab:blue")
    ax1.set_xticks(range(len(rows)), [r["group"] for r in rows], rotation=45, ha="right")
    ax1.set_ylabel("‖θ_B − θ_A‖ / ‖θ_A‖")
    ax1.set_title("relative weight change per layer group")
    cka = result["cka"]
    ax2.plot(range(len(cka)), [c["cka"] for c in cka], marker="o", color="tab:orange")
    ax2.set_xticks(range(len(cka)), [c["layer"] for c in cka], rotation=45, ha="right")
    ax2.set_ylim(0, 1.05)
    ax2.set_ylabel("linear CKA(A, B)")
    ax2.set_title(f"feature similarity on {result['probe_samples']} probe samples")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"{result['tower']} tower: {result['a']} → {result['b']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
