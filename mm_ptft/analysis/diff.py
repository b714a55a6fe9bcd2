"""``mm-ptft diff``: what fine-tuning changed in a tower.

    mm-ptft diff runs/pretrain-fmnist runs/finetune-fmnist --probe data/fmnist [--tower image|text]
                 [--split test] [--max-samples 500] [--out DIR] [-c CONFIG] [overrides…]

A and B are weights (run dir, checkpoint dir of any ZeRO stage, or .safetensors) that both hold the tower's
``image.*`` (or ``text.*``) weights: a pretraining dual encoder and a classifier fine-tuned from it, say. The tower
is built from A's saved config (or ``--config``). Reports, as ``diff.json`` and ``diff.png``:

* per layer group (embeddings, each block, final norm, projection): relative weight change ‖θ_B − θ_A‖ / ‖θ_A‖;
* per layer: linear CKA between A's and B's features of the same probe samples — image towers: each block's output
  tokens (timm ``forward_intermediates``), text towers: each layer's mask-averaged token states; then the pooled
  features and the projected embedding.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mm_ptft import checkpoint as ckpt
from mm_ptft.analysis.cka import linear_cka
from mm_ptft.analysis.drift import group_label, relative_change
from mm_ptft.config import Config, ConfigError, apply_overrides, config_from_dict, load_config


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
    """Decoded probe batches (the evaluation transform / tokenizer of the tower's config), one process."""
    from mm_ptft.data import Collator, EvalStream, SampleDecoder, create_transform, make_loader, resolve_shards
    from mm_ptft.models import create_tokenizer, tokenize
    from mm_ptft.train.trainer import image_norm_stats

    shards = resolve_shards(probe, split)
    if kind == "image":
        mean, std = image_norm_stats(cfg)
        image = cfg.model.image
        transform = create_transform(cfg.data.image, image.image_size, image.in_chans, mean, std, train=False)
        decode = SampleDecoder(transform, cfg.data.image_keys, need_caption=False)
        collate = Collator(None)
    else:
        tokenizer = create_tokenizer(cfg.model.text)
        decode = SampleDecoder(None, cfg.data.image_keys, cfg.data.caption_key, need_image=False)
        collate = Collator(lambda texts: tokenize(tokenizer, texts, cfg.model.text.context_length))
    stream = EvalStream(shards, decode, collate, batch_size, 0, 1, 1, max_samples)
    return make_loader(stream, 0, 2)


def diff_towers(
    a: str, b: str, probe: str, cfg: Config, kind: str = "image", split: str = "test", max_samples: int = 500
) -> dict:
    """Weight change per layer group and CKA per layer between the ``kind`` towers of weights ``a`` and ``b``."""
    from mm_ptft.finetune.model import load_tower

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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mm-ptft diff", description=__doc__.split("\n")[0])
    p.add_argument("a", help="reference weights (e.g. the pretraining run)")
    p.add_argument("b", help="weights to compare (e.g. a fine-tuned run)")
    p.add_argument("--probe", required=True, help="probe data: a dataset dir or shard pattern")
    p.add_argument("--tower", choices=["image", "text"], default="image")
    p.add_argument("--split", default="test", help="split of a dataset dir to probe with")
    p.add_argument("--max-samples", type=int, default=500, help="probe samples (CKA costs O(n²) memory)")
    p.add_argument("--out", help="output directory (default: <b>/diff if b is a directory, else ./diff)")
    p.add_argument("--config", "-c", help="config for the tower (default: the one saved with A, else B)")
    p.add_argument("overrides", nargs="*", help="dotted overrides of that config")
    args = p.parse_intermixed_args(argv)  # overrides may follow the options
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    if args.config:
        cfg = load_config(args.config, args.overrides)
    else:
        data = ckpt.config_of(args.a) or ckpt.config_of(args.b)
        if data is None:
            raise ConfigError(f"config: no config.yaml beside {args.a} or {args.b}; pass --config")
        cfg = config_from_dict(apply_overrides(data, args.overrides))
    result = diff_towers(args.a, args.b, args.probe, cfg, args.tower, args.split, args.max_samples)
    out = Path(args.out) if args.out else (Path(args.b) / "diff" if Path(args.b).is_dir() else Path("diff"))
    out.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_text(out / "diff.json", json.dumps(result, indent=1) + "\n")
    plot_diff(result, out / "diff.png")
    for r in result["weight_change"]:
        print(f"{r['group']:>12}  relative change {r['relative_change']:.4f}")
    for c in result["cka"]:
        print(f"{c['layer']:>12}  CKA {c['cka']:.4f}")
    print(f"wrote {out / 'diff.json'} and {out / 'diff.png'}")
    return 0
