"""WiSE-FT (Wortsman et al., 2022): interpolate the zero-shot and the fine-tuned classifier's weights,
θ(α) = (1 − α)·θ_zs + α·θ_ft, and evaluate each α (``mm-ptft wise-ft``).

θ_zs is the run's initial model — the image tower of ``finetune.init`` with the zero-shot head built from its text
tower (``finetune.head_init=zeroshot``), rebuilt from the run's config; θ_ft is the run's ``best.safetensors`` (or
``model.safetensors``). Writes ``wise_ft.json``, ``wise_ft.md`` and ``wise_ft.png`` (default: ``<run>/wise_ft/``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mm_ptft import checkpoint as ckpt
from mm_ptft.config import Config, ConfigError

DEFAULT_ALPHAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def interpolate(zeroshot: dict[str, torch.Tensor], finetuned: dict[str, torch.Tensor], alpha: float) -> dict:
    """θ(α) = (1 − α)·θ_zs + α·θ_ft, tensor by tensor (exactly θ_zs at α=0 and θ_ft at α=1).

    Raises:
        CheckpointError: the two states hold different tensor names or shapes.
    """
    if zeroshot.keys() != finetuned.keys():
        extra = sorted(set(zeroshot) ^ set(finetuned))
        raise ckpt.CheckpointError(f"checkpoint: zero-shot and fine-tuned weights differ in names, e.g. {extra[0]}")
    out = {}
    for name, start in zeroshot.items():
        end = finetuned[name]
        if start.shape != end.shape:
            raise ckpt.CheckpointError(f"checkpoint: {name} is {tuple(start.shape)} vs {tuple(end.shape)}")
        if start.is_floating_point():
            # lerp returns `end` exactly at weight 1 and `start` exactly at weight 0
            out[name] = torch.lerp(start.float(), end.float(), float(alpha))
        else:
            out[name] = end.clone()
    return out


def run_config(run_dir: Path, overrides: list[str]) -> Config:
    from mm_ptft.tasks import configure_task

    cfg = configure_task(ckpt.saved_config(run_dir, overrides, hint=" (wise-ft reads the run's own config)"))
    head_init = cfg.finetune.head_init if cfg.finetune is not None else None
    if cfg.task != "classification" or head_init != "zeroshot":
        raise ConfigError(
            f"config: wise-ft needs a run of task classification with finetune.head_init=zeroshot; {run_dir} has "
            f"task {cfg.task}, head_init {head_init}"
        )
    return cfg


def finetuned_weights(run_dir: Path, which: str) -> Path:
    path = run_dir / ("best.safetensors" if which == "best" else "model.safetensors")
    if which == "best" and not path.is_file():
        path = run_dir / "model.safetensors"  # a run without eval.select_metric keeps only its final weights
    if not path.is_file():
        raise ckpt.CheckpointError(f"checkpoint: {path} does not exist (did the run finish?)")
    return path


def wise_ft(run_dir: str | Path, alphas: list[float], which: str = "best", overrides: list[str] | None = None):
    """Evaluate θ(α) for each α with the ``classification`` evaluator on the run's ``eval.data`` / ``eval.split``.

    Returns:
        (rows ``[{"alpha", "acc1", "acc5", "mean_per_class_recall", "loss"}]``, the fine-tuned weights' path).
    """
    from mm_ptft.eval import evaluate_model
    from mm_ptft.tasks import create_task, for_loading

    run_dir = Path(run_dir)
    cfg = run_config(run_dir, [*(overrides or []), "eval.evaluators=[classification]"])
    source = finetuned_weights(run_dir, which)
    theta_zs = {k: v.detach().clone() for k, v in create_task(cfg).model.state_dict().items()}
    # a LoRA / IA3 run's start has peft's names (identity adapters): as plain weights, like the merged theta_ft
    theta_zs = ckpt.merge_adapters(theta_zs, cfg.finetune.lora.alpha if cfg.finetune is not None else None)
    theta_ft = ckpt.load_weights(source)
    task = create_task(for_loading(cfg))
    rows = []
    for alpha in alphas:
        ckpt.load_model_weights(task.model, interpolate(theta_zs, theta_ft, alpha), what=f"θ(α={alpha})")
        metrics = evaluate_model(cfg, task.eval())
        rows.append({"alpha": alpha, **{k.split("/", 1)[1]: v for k, v in metrics.items()}})
        print(f"alpha={alpha:.2f} acc1={rows[-1]['acc1']:.4f}", flush=True)
    return rows, source


def write_outputs(rows: list[dict], out_dir: Path, meta: dict) -> None:
    """``wise_ft.json`` (rows + meta), ``wise_ft.md`` (a table) and ``wise_ft.png`` (accuracy vs α)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_text(out_dir / "wise_ft.json", json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    lines = [
        f"WiSE-FT of `{meta['run']}` on `{meta['eval_data']}` ({meta['eval_split']}), θ_ft = `{meta['finetuned']}`",
        "",
        "| α | top-1 | top-5 | mean per-class recall | loss |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['alpha']:.2f} | {r['acc1']:.4f} | {r.get('acc5', float('nan')):.4f} | "
            f"{r['mean_per_class_recall']:.4f} | {r['loss']:.4f} |"
        )
    ckpt.atomic_write_text(out_dir / "wise_ft.md", "\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["alpha"] for r in rows], [r["acc1"] for r in rows], marker="o")
    ax.set_xlabel("α  (0 = zero-shot, 1 = fine-tuned)")
    ax.set_ylabel(f"top-1 ({meta['eval_split']})")
    ax.set_title("WiSE-FT weight interpolation")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "wise_ft.png", dpi=120)
    plt.close(fig)
