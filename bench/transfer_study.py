"""Transfer study: the pretrained image tower vs the same architecture from scratch, at several fractions of the
training labels, for each freeze policy — a table and a plot.

    python bench/transfer_study.py prepare --data data/fmnist                    # stratified 1 % / 10 % subsets
    OMP_NUM_THREADS=1 deepspeed --num_gpus 2 bench/transfer_study.py run \\
        --pretrained runs/pretrain-fmnist-cnn --out runs/ft-study [overrides…]
    python bench/transfer_study.py report --out runs/ft-study              # table + plot again

``run`` trains every (fraction, policy, init) cell of ``configs/finetune/fmnist-study.yaml`` in one launch (one
process start-up for all of them), each for a fixed number of optimizer steps (``POLICY``, the same at every label
fraction, sized so the whole study takes about 15 minutes on 2 CPU ranks × 1 thread), and scores each on the full
test split at its end (no model selection, so the test split is never used for a choice). Scratch cells train
without layer-wise lr decay (there is nothing pretrained to preserve). Finished cells are kept in ``results.json``
and skipped when the study is run again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

FRACTIONS = (0.01, 0.1, 1.0)
POLICIES = ("linear-probe", "last-n", "full", "lora")
INITS = ("pretrained", "scratch")
# per policy: optimizer steps (global batch 2 × 128, the same at every label fraction) and its overrides. Sized by
# the throughput on 2 CPU ranks × 1 thread with the half-width ResNet-18 at 48 px (full ≈ 1000 samples/s) so the 18
# cells take about 15 minutes (each also builds, tests on the 10k test images and saves: ≈ 15 s).
POLICY = {
    "linear-probe": {"steps": 250, "overrides": ["optim.lr=1e-2", "optim.weight_decay=0.0"]},
    "last-n": {"steps": 250, "overrides": ["optim.lr=2e-3"]},
    "full": {"steps": 200, "overrides": ["optim.lr=2e-3"]},
    # rank 4: 2.6 % of the CNN tower's parameters (2.7 % of the ViT recipe's) train; adapters need a higher lr
    "lora": {
        "steps": 200,
        "overrides": ["optim.lr=5e-3", "optim.layer_decay=null", "finetune.lora.rank=4", "finetune.lora.alpha=8"],
    },
}
ROOT = Path(__file__).resolve().parents[1]
STUDY_CONFIG = ROOT / "configs" / "finetune" / "fmnist-study.yaml"


def subset_dir(data: Path, fraction: float) -> Path:
    """Where ``prepare`` writes the ``fraction`` subset of ``data``'s train split (``data`` itself at 100 %)."""
    return data if fraction >= 1.0 else data.parent / f"{data.name}-f{fraction:g}"


def prepare(data: Path, fractions: tuple[float, ...] = FRACTIONS, seed: int = 0) -> None:
    """Write the class-stratified subsets (nested: the 1 % subset is inside the 10 % one) that ``run`` trains on."""
    from data_tools.subset import write_subset

    for fraction in fractions:
        out = subset_dir(data, fraction)
        if fraction < 1.0 and not (out / "dataset.json").is_file():
            entries = write_subset(data, out, fraction, 0.0, "train", seed, shard_size=500, overwrite=True)
            print(f"{out}: {entries['train']['num_samples']} training samples")


def cell_name(fraction: float, policy: str, init: str) -> str:
    return f"f{fraction:g}-{policy}-{init}"


def run_cell(fraction, policy, init, args, local_rank) -> dict:
    """Train and test one cell; returns its result row (on every rank)."""
    from mm_ptft.config import load_config
    from mm_ptft.train.trainer import Trainer

    overrides = [
        f"data.train={subset_dir(Path(args.data), fraction)}",
        f"eval.data={args.data}",
        f"finetune.policy={policy}",
        f"finetune.init={args.pretrained if init == 'pretrained' else 'null'}",
        f"train.steps={max(1, round(POLICY[policy]['steps'] * args.steps_scale))}",
        *POLICY[policy]["overrides"],
        *(["optim.layer_decay=null"] if init == "scratch" else []),
        f"train.output_dir={Path(args.out) / 'runs'}",
        f"train.name={cell_name(fraction, policy, init)}",
        "train.progress=false",
        "train.report=false",
        *args.overrides,
    ]
    cfg = load_config(args.config, overrides)
    t0 = time.perf_counter()
    summary = Trainer(cfg, local_rank=local_rank).train()
    return {
        "fraction": fraction,
        "policy": policy,
        "init": init,
        "steps": summary["step"],
        "train_samples": summary["samples"],
        "test_acc1": summary["classification/acc1"],
        "test_mean_per_class_recall": summary["classification/mean_per_class_recall"],
        "tower_trainable_share": summary.get("params/tower_trainable_share"),
        "seconds": time.perf_counter() - t0,
    }


def run(args: argparse.Namespace) -> None:
    from mm_ptft.distributed import barrier, is_main_process

    out = Path(args.out)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text())["rows"] if results_path.is_file() else []
    done = {cell_name(r["fraction"], r["policy"], r["init"]) for r in results}
    t0 = time.perf_counter()
    for fraction in args.fractions:
        for policy in args.policies:
            for init in args.inits:
                if cell_name(fraction, policy, init) in done:
                    continue
                row = run_cell(fraction, policy, init, args, args.local_rank)
                if is_main_process():
                    results.append(row)
                    out.mkdir(parents=True, exist_ok=True)
                    results_path.write_text(json.dumps({"rows": results}, indent=1) + "\n")
                    print(f"[study] {cell_name(fraction, policy, init)}: test top-1 {row['test_acc1']:.4f}", flush=True)
                barrier()
    if is_main_process():
        print(f"[study] {time.perf_counter() - t0:.0f} s for this launch", flush=True)
        report(out)


def report(out: Path) -> None:
    """``results.md`` (pretrained vs scratch per fraction and policy) and ``transfer.png`` from ``results.json``."""
    rows = json.loads((out / "results.json").read_text())["rows"]
    cell = {(r["fraction"], r["policy"], r["init"]): r for r in rows}
    fractions = sorted({r["fraction"] for r in rows})
    policies = [p for p in POLICIES if any(r["policy"] == p for r in rows)]
    lines = [
        "| labels | policy | tower trains | pretrained | scratch | Δ | steps | seconds (pre / scratch) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]

    def fmt(row: dict | None, key: str, spec: str) -> str:
        return "—" if row is None or row.get(key) is None else format(row[key], spec)

    for fraction in fractions:
        for policy in policies:
            pre, scratch = cell.get((fraction, policy, "pretrained")), cell.get((fraction, policy, "scratch"))
            if pre is None and scratch is None:
                continue
            either = pre or scratch
            delta = "—" if pre is None or scratch is None else f"{pre['test_acc1'] - scratch['test_acc1']:+.4f}"
            lines.append(
                f"| {fraction:.0%} | {policy} | {fmt(either, 'tower_trainable_share', '.2%')} | "
                f"{fmt(pre, 'test_acc1', '.4f')} | {fmt(scratch, 'test_acc1', '.4f')} | {delta} | {either['steps']} | "
                f"{fmt(pre, 'seconds', '.0f')} / {fmt(scratch, 'seconds', '.0f')} |"
            )
    total = sum(r["seconds"] for r in rows)
    pairs = [
        (cell[(f, p, "pretrained")]["test_acc1"], cell[(f, p, "scratch")]["test_acc1"])
        for f in fractions
        for p in policies
        if (f, p, "pretrained") in cell and (f, p, "scratch") in cell
    ]
    wins = sum(pre >= scratch for pre, scratch in pairs)
    lines += [
        "",
        f"Test top-1 on the full test split; pretrained ≥ scratch in {wins} of {len(pairs)} cells; "
        f"{len(rows)} runs, {total / 60:.1f} min of training + testing.",
    ]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    _plot(rows, fractions, policies, out / "transfer.png")
    print((out / "results.md").read_text())


def _plot(rows: list[dict], fractions: list[float], policies: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    colors = dict(zip(POLICIES, ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    for policy in policies:
        for init, style in (("pretrained", "-"), ("scratch", "--")):
            points = sorted(
                (r["fraction"], r["test_acc1"]) for r in rows if r["policy"] == policy and r["init"] == init
            )
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, style, marker="o", color=colors[policy], label=f"{policy}, {init}")
    ax.set_xscale("log")
    ax.set_xticks(fractions, [f"{f:.0%}" for f in fractions])
    ax.set_xlabel("fraction of training labels")
    ax.set_ylabel("test top-1")
    ax.set_title("Fashion-MNIST: pretrained tower vs scratch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/transfer_study.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="write the label-fraction subsets")
    prep.add_argument("--data", default="data/fmnist")
    prep.add_argument("--fractions", type=_floats, default=FRACTIONS)
    r = sub.add_parser("run", help="train and test every cell (under deepspeed / torchrun for several ranks)")
    r.add_argument("--pretrained", required=True, help="pretraining run (finetune.init of the pretrained cells)")
    r.add_argument("--out", default="runs/ft-study")
    r.add_argument("--data", default="data/fmnist")
    r.add_argument("--config", default=str(STUDY_CONFIG))
    r.add_argument("--fractions", type=_floats, default=FRACTIONS)
    r.add_argument("--policies", type=lambda s: tuple(s.split(",")), default=POLICIES)
    r.add_argument("--inits", type=lambda s: tuple(s.split(",")), default=INITS, help="pretrained,scratch")
    r.add_argument("--steps-scale", type=float, default=1.0, help="multiply every cell's steps (quick looks)")
    r.add_argument("overrides", nargs="*", help="dotted overrides for every cell (after the options)")
    rep = sub.add_parser("report", help="rewrite results.md and transfer.png from results.json")
    rep.add_argument("--out", default="runs/ft-study")
    argv = list(sys.argv[1:] if argv is None else argv)
    # the deepspeed launcher puts --local_rank=N before the subcommand
    ranks = [a for a in argv if a.startswith(("--local_rank=", "--local-rank="))]
    args = p.parse_args([a for a in argv if a not in ranks])
    args.local_rank = int(ranks[-1].split("=", 1)[1]) if ranks else None
    if args.command == "prepare":
        prepare(Path(args.data), args.fractions)
    elif args.command == "run":
        run(args)
    else:
        report(Path(args.out))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
