"""``mm-ptft sweep``: a budgeted Optuna search over fine-tuning strategies, each trial a real run."""

from __future__ import annotations

import argparse
import signal

from mm_ptft.cli.base import COMMANDS


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _terminate_as_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM: stop the running trial and queue it again, as Ctrl-C does


@COMMANDS.register("sweep")
def cmd_sweep(argv: list[str]) -> int:
    """Search fine-tuning strategies (policy × lr × steps …) with Optuna: TPE, pruning on the validation metric.

    mm-ptft sweep -c configs/finetune/fmnist-cnn-full.yaml --space configs/sweep/fmnist-cnn-space.yaml
                  --out runs/sweep-fmnist-cnn --trials 12 [--timeout-min 60] [--ranks 2 [--launcher deepspeed]]
                  [--test-data data/fmnist] [--test-split test] [overrides…]

    Each trial runs ``mm-ptft train -c CONFIG overrides… params…`` into OUT/trials/<number>/ and is judged on the
    base config's eval.select_metric (its eval.data / eval.split: the validation split). The study lives in
    OUT/study.db: the same command resumes a killed sweep. At the end: OUT/best.yaml (a recipe for
    ``mm-ptft train -c``), the test split scored once for that config (OUT/test.json), OUT/report.md and plots.
    """
    import optuna

    from mm_ptft.sweep import run_sweep

    p = argparse.ArgumentParser(prog="mm-ptft sweep", description=cmd_sweep.__doc__.split("\n")[0])
    p.add_argument("--config", "-c", required=True, help="the base fine-tuning config every trial starts from")
    p.add_argument("--space", required=True, help="search space YAML (see configs/sweep/)")
    p.add_argument("--out", required=True, help="sweep directory: study.db, trials/, best.yaml, report.md, plots/")
    p.add_argument("--trials", type=_positive_int, help="budget: finished trials, over every start of the sweep")
    p.add_argument("--timeout-min", type=_positive_float, help="budget: wall minutes, over every start of the sweep")
    p.add_argument("--ranks", type=_positive_int, default=1, help="ranks per trial (> 1: under --launcher)")
    p.add_argument("--launcher", choices=["torchrun", "deepspeed"], default="torchrun", help="launcher for --ranks > 1")
    p.add_argument("--test-data", help="held-out test data scored once for the chosen config (default: eval.data)")
    p.add_argument("--test-split", default="test", help="split of --test-data (default: test)")
    p.add_argument("--poll-s", type=_positive_float, default=1.0, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="dotted overrides of the base config, for every trial")
    args = p.parse_intermixed_args(argv)  # overrides may follow the options
    if args.trials is None and args.timeout_min is None:
        p.error("give a budget: --trials and/or --timeout-min")
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep prints one line per trial itself
    previous = signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    try:
        result = run_sweep(
            args.config,
            args.space,
            args.out,
            trials=args.trials,
            timeout_min=args.timeout_min,
            ranks=args.ranks,
            launcher=args.launcher,
            overrides=args.overrides,
            test_data=args.test_data,
            test_split=args.test_split,
            poll_s=args.poll_s,
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
    if result.best is not None:
        print(f"best: trial {result.best.number}, value {result.best.value:.4f}; recipe {result.out / 'best.yaml'}")
    print(f"report: {result.out / 'report.md'}")
    return 0
