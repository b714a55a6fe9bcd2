"""The sweep: a persistent Optuna study whose trials are real fine-tuning runs, pruned on the validation metric.

``run_sweep`` checks everything before the first trial (space, base config, validation and test data), opens
``OUT/study.db`` (SQLite; created, or resumed), then runs trials until the budget is spent:

* each trial: TPE (seeded) proposes the space's parameters; ``mm-ptft train -c BASE overrides… params…`` runs in
  ``OUT/trials/<number>/``; every evaluation of ``eval.select_metric`` in its ``metrics.jsonl`` (the validation
  split, every ``eval.every`` steps) is reported to Optuna at its step, and the pruner may stop it there (its process
  group is terminated). A finished run's value is its best evaluation (the one in its ``best.safetensors``).
* budget: ``trials`` counts finished trials (complete, pruned, failed) over every start of the sweep; ``timeout_min``
  counts the sweep's wall time over every start (kept in the study). No trial starts once either is spent; a
  running trial is let finish.
* resume: the same command continues the study. A trial left running by a killed sweep is marked FAIL and its
  parameters are queued again (the re-queued trial has a new number and ``requeued_from``); the interrupted one
  does not count against the budget. Finished trials are never run again. One sweep at a time per ``OUT``
  (``OUT/sweep.lock``).
* end: ``OUT/best.yaml`` (the best trial's full config, loadable by ``mm-ptft train -c``), the test split scored
  once on the best trial's ``best.safetensors`` (``OUT/test.json``, kept in the study: a rerun does not score it
  again), ``OUT/report.md`` and ``OUT/plots/*.png``.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from mm_ptft.config import Config, ConfigError, config_to_dict, load_config
from mm_ptft.sweep.space import SearchSpace, SweepError, load_space, short_value
from mm_ptft.sweep.trial import (
    TrialProcess,
    kill_group,
    last_error_line,
    leftover_alive,
    trial_command,
    trial_env,
)

if TYPE_CHECKING:
    import optuna

STUDY_NAME = "sweep"
STUDY_DB = "study.db"
TRIALS_DIR = "trials"
BEST_YAML = "best.yaml"
TEST_JSON = "test.json"
LOCK = "sweep.lock"
SAVE_ELAPSED_EVERY_S = 10.0  # how often the study's wall-time counter is written while a trial runs
SWEEP_SETS = ("train.output_dir", "train.name", "train.resume", "train.stop_after")  # per trial, by the sweep
MAX_FAILURES_IN_A_ROW = 3  # stop a sweep whose trials keep crashing (a broken setup, not a bad config)


@dataclass
class SweepResult:
    """What a sweep left: its study, the best trial (None if none completed), its test metrics, the files."""

    out: Path
    study: optuna.Study
    best: optuna.trial.FrozenTrial | None
    test: dict[str, Any] | None
    stopped: str  # why no more trials were started
    files: list[Path] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------------
# Checks before any trial
# ---------------------------------------------------------------------------------------------------------------------


def _check_base(cfg: Config, test_data: str, test_split: str) -> None:
    """What a sweep needs from the base config: a validation split, a metric to select on, a separate test split."""
    ev = cfg.eval
    if ev.select_metric is None:
        raise SweepError("sweep: the base config has no eval.select_metric (the validation metric trials compete on)")
    if not ev.data:
        raise SweepError("sweep: the base config has no eval.data (the validation split trials are evaluated on)")
    owner = [part for part in ev.select_metric.split("/")[:-1] if part in ev.evaluators]
    if not owner:
        raise SweepError(
            f"sweep: eval.select_metric '{ev.select_metric}' names no evaluator of eval.evaluators "
            f"({', '.join(ev.evaluators)}); e.g. '{ev.evaluators[0]}/acc1'"
        )
    if (Path(test_data).resolve(), test_split) == (Path(ev.data).resolve(), ev.split):
        raise SweepError(
            f"sweep: the test split ({test_data}, split {test_split}) is the validation split trials are selected "
            "on (eval.data, eval.split); give the held-out test data with --test-data / --test-split"
        )


def _check_data(cfg: Config, test_data: str, test_split: str) -> None:
    """Training shards, the validation plan and the test plan resolve (one-line DataError / ConfigError)."""
    from mm_ptft.data.mix import resolve_sources
    from mm_ptft.eval import plan_eval

    if cfg.data.train is None:
        raise SweepError("sweep: the base config has no data.train")
    resolve_sources(cfg.data)
    plan_eval(cfg)
    plan_eval(_test_config(cfg, test_data, test_split))


def _test_config(cfg: Config, test_data: str, test_split: str) -> Config:
    out = copy.deepcopy(cfg)
    out.eval.data, out.eval.split = test_data, test_split
    return out


# ---------------------------------------------------------------------------------------------------------------------
# The study: created or resumed, one sweep at a time
# ---------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _lock(out: Path) -> Iterator[None]:
    path = out / LOCK
    with path.open("a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise SweepError(f"sweep: another mm-ptft sweep runs on {out} (pid {f.read().strip() or '?'})") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _fingerprint(base: dict, space: SearchSpace, ranks: int) -> dict[str, str]:
    def digest(obj: Any) -> str:
        return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]

    return {"base": digest(base), "space": digest(space.to_dict()), "ranks": str(ranks)}


def _open_study(out: Path, space: SearchSpace, direction: str, setup: dict[str, str]) -> optuna.Study:
    import optuna

    storage = f"sqlite:///{(out / STUDY_DB).resolve()}"
    study = optuna.create_study(
        storage=storage,
        study_name=STUDY_NAME,
        direction=direction,
        load_if_exists=True,
        pruner=space.create_pruner(),
        sampler=space.create_sampler(0),
    )
    previous = study.user_attrs.get("setup")
    if previous is None:
        study.set_user_attr("setup", setup)
        study.set_user_attr("elapsed_s", 0.0)
    else:
        what = {"base": "the base config (resolved, overrides included)", "space": "the space", "ranks": "--ranks"}
        changed = [what[k] for k in what if previous.get(k) != setup[k]]
        if changed:
            raise SweepError(
                f"sweep: {out / STUDY_DB} was started with another {' and '.join(changed)}; rerun with the same "
                "arguments to resume it, or give a new --out"
            )
    return study


def _requeued(study: optuna.Study) -> set[int]:
    return {t.user_attrs["requeued_from"] for t in study.get_trials(deepcopy=False) if "requeued_from" in t.user_attrs}


def _finished(study: optuna.Study) -> int:
    """Trials that count against the budget: complete, pruned, or failed (except the re-queued interrupted ones)."""
    from optuna.trial import TrialState

    requeued = _requeued(study)
    done = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return sum(1 for t in study.get_trials(deepcopy=False, states=done) if t.number not in requeued)


def _recover_interrupted(study: optuna.Study, trials_dir: Path) -> None:
    """Trials a killed sweep left RUNNING: stop what is left of their runs, mark them FAIL, queue their params."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = t.user_attrs.get("pid")
        if leftover_alive(pid, f"train.output_dir={trials_dir}"):
            kill_group(pid)
        study.tell(t.number, state=TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"requeued_from": t.number})
        print(f"[sweep] trial {t.number} was interrupted (the sweep was killed): FAIL, its parameters queued again")


# ---------------------------------------------------------------------------------------------------------------------
# One trial
# ---------------------------------------------------------------------------------------------------------------------


def _trial_overrides(trials_dir: Path, number: int) -> list[str]:
    return [
        f"train.output_dir={trials_dir}",
        f"train.name='{number}'",  # quoted: a string, not the YAML integer
        "train.resume=null",
        "train.progress=false",
        "train.consolidate=true",  # best.safetensors is what the test split scores
    ]


class _Clock:
    """The sweep's wall time over all its starts (the study's ``elapsed_s`` + this start's)."""

    def __init__(self, study: optuna.Study):
        self.study = study
        self.before = float(study.user_attrs.get("elapsed_s", 0.0))
        self.t0 = time.monotonic()
        self.saved = self.t0

    def elapsed(self) -> float:
        return self.before + time.monotonic() - self.t0

    def save(self, force: bool = True) -> None:
        now = time.monotonic()
        if force or now - self.saved >= SAVE_ELAPSED_EVERY_S:
            self.study.set_user_attr("elapsed_s", self.elapsed())
            self.saved = now


def _run_trial(
    study: optuna.Study,
    space: SearchSpace,
    base: Path,
    overrides: list[str],
    metric: str,
    trials_dir: Path,
    ranks: int,
    launcher: str,
    clock: _Clock,
    poll_s: float,
) -> optuna.trial.FrozenTrial:
    """Ask for a trial, run it, tell its result; an interrupted sweep stops the run and queues its parameters."""
    from optuna.trial import TrialState

    trial = study.ask()
    params = space.suggest(trial)
    run_dir = trials_dir / str(trial.number)
    trial_overrides = [*overrides, *space.overrides(params), *_trial_overrides(trials_dir, trial.number)]
    final_step = load_config(base, trial_overrides).train.steps  # None: set by epochs, known to the run only
    proc = TrialProcess(trial_command(base, trial_overrides, ranks, launcher), run_dir, trial_env(ranks)).start()
    trial.set_user_attr("pid", proc.pid)
    trial.set_user_attr("run_dir", str(run_dir))
    print(f"[sweep] trial {trial.number}: {' '.join(space.overrides(params))}  ({run_dir})", flush=True)
    try:
        state, last_step, best_seen = _watch(study, trial, proc, metric, final_step, clock, poll_s)
    except BaseException:  # interrupted (Ctrl-C, SIGTERM): stop the run, queue its parameters again
        proc.stop()
        study.tell(trial, state=TrialState.FAIL)
        study.enqueue_trial(params, user_attrs={"requeued_from": trial.number})
        raise
    finally:
        clock.save()
    return _tell(study, trial, proc, state, metric, last_step, best_seen)


def _watch(study, trial, proc: TrialProcess, metric: str, final_step: int | None, clock: _Clock, poll_s: float):
    """Report each evaluation of ``metric`` as the run logs it; stop the run where the pruner says so (never at
    its final evaluation: nothing is left to save there). Returns (state, last reported step, best value)."""
    from optuna.trial import TrialState

    last_step, best_seen = None, None
    while True:
        rc = proc.poll()
        for record in proc.new_evals():
            if record.get(metric) is None:
                continue
            value, last_step = float(record[metric]), int(record["step"])
            best_seen = value if best_seen is None else _better(study, value, best_seen)
            trial.report(value, last_step)
            if rc is None and (final_step is None or last_step < final_step) and trial.should_prune():
                # a run that ended on its own meanwhile completed (exit status 0), whatever the pruner thought
                if proc.stop() == 0:
                    return TrialState.COMPLETE, last_step, best_seen
                return TrialState.PRUNED, last_step, best_seen
        if rc is not None:
            return (TrialState.COMPLETE if rc == 0 else TrialState.FAIL), last_step, best_seen
        clock.save(force=False)
        time.sleep(poll_s)


def _tell(study, trial, proc: TrialProcess, state, metric: str, last_step: int | None, best_seen: float | None):
    from optuna.trial import TrialState

    trial.set_user_attr("minutes", proc.minutes())
    if last_step is not None:
        trial.set_user_attr("last_step", last_step)
    if state == TrialState.COMPLETE:
        value = _run_value(proc.run_dir, metric, best_seen)
        if value is None:
            state = TrialState.FAIL
            trial.set_user_attr("error", f"the run logged no {metric}")
        else:
            study.tell(trial, value)
    if state == TrialState.PRUNED:
        trial.set_user_attr("pruned_at", last_step)
        study.tell(trial, state=TrialState.PRUNED)
    if state == TrialState.FAIL:
        if "error" not in trial.user_attrs:
            trial.set_user_attr("error", last_error_line(proc.log_tail()))
        study.tell(trial, state=TrialState.FAIL)
    frozen = study.get_trials(deepcopy=False)[trial.number]
    value = "" if frozen.value is None else f" {metric}={frozen.value:.4f}"
    extra = f" at step {last_step}" if state == TrialState.PRUNED else ""
    note = f": {frozen.user_attrs.get('error')} (log: {proc.log_path})" if state == TrialState.FAIL else ""
    print(f"[sweep] trial {trial.number} {state.name}{extra}{value} in {proc.minutes():.1f} min{note}", flush=True)
    return frozen


def _better(study: optuna.Study, a: float, b: float) -> float:
    return max(a, b) if study.direction.name == "MAXIMIZE" else min(a, b)


def _run_value(run_dir: Path, metric: str, best_seen: float | None) -> float | None:
    """A finished run's value: the best evaluation it kept (its summary's ``best/<metric>``), else the best seen."""
    from mm_ptft.report import read_metrics

    records, _ = read_metrics(run_dir / "metrics.jsonl")
    summaries = [r for r in records if r.get("kind") == "summary"]
    if summaries and summaries[-1].get(f"best/{metric}") is not None:
        return float(summaries[-1][f"best/{metric}"])
    return best_seen


# ---------------------------------------------------------------------------------------------------------------------
# The end: the best config, its test score, the report
# ---------------------------------------------------------------------------------------------------------------------


def best_config(base: Path, overrides: list[str], space: SearchSpace, params: dict[str, Any], name: str) -> Config:
    """The full config of a trial with ``params``, as a recipe: the base + overrides + params, named ``name``."""
    from mm_ptft.tasks import configure_task

    cfg = configure_task(load_config(base, [*overrides, *space.overrides(params)]))
    cfg.train.name = name
    return cfg


def write_best_yaml(path: Path, cfg: Config, trial: optuna.trial.FrozenTrial, metric: str, test: dict | None) -> None:
    from mm_ptft import checkpoint as ckpt

    lines = [
        f"# mm-ptft sweep {path.parent}: trial {trial.number} of {path.parent / STUDY_DB}, best on validation",
        f"# {metric} = {trial.value:.4f} (validation); parameters: "
        + ", ".join(f"{k}={short_value(v)}" for k, v in trial.params.items()),
    ]
    if test is not None and test.get("trial") == trial.number:
        shown = ", ".join(f"{k}={v:.4f}" for k, v in test["metrics"].items() if not k.endswith("/n"))
        lines.append(f"# test split ({test['data']}, {test['split']}), scored once: {shown}")
    lines.append(f"# its weights: {trial.user_attrs.get('run_dir')}/best.safetensors; train it again with:")
    lines.append(f"#   mm-ptft train -c {path}")
    text = "\n".join(lines) + "\n" + yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    ckpt.atomic_write_text(path, text)


def score_test(run_dir: Path, test_data: str, test_split: str) -> dict[str, float]:
    """Evaluate a trial's ``best.safetensors`` (else ``model.safetensors``) on the test split, as ``mm-ptft eval``
    does: the run's saved config with ``eval.data`` / ``eval.split`` pointing at the test split, all of it
    (``eval.max_samples`` lifted)."""
    import torch

    from mm_ptft import checkpoint as ckpt
    from mm_ptft import eval as evaluation
    from mm_ptft.tasks import load_trained

    weights = run_dir / "best.safetensors"
    if not weights.is_file():
        weights = run_dir / "model.safetensors"
    cfg = ckpt.saved_config(weights, [f"eval.data={test_data}", f"eval.split={test_split}", "eval.max_samples=null"])
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    cfg, task = load_trained(weights, cfg)
    return evaluation.evaluate_model(cfg, task)


def _finish(
    out: Path,
    study: optuna.Study,
    space: SearchSpace,
    base: Path,
    overrides: list[str],
    metric: str,
    test_data: str,
    test_split: str,
) -> tuple[optuna.trial.FrozenTrial | None, dict | None, list[Path]]:
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        print("[sweep] no trial completed: no best config, the test split is not scored", flush=True)
        return None, None, []
    best = study.best_trial
    tests = list(study.user_attrs.get("tests", []))
    test = next((t for t in tests if t["trial"] == best.number), None)
    if test is None:  # the chosen config's test score, once: later runs of the command read it from the study
        run_dir = Path(best.user_attrs["run_dir"])
        metrics = score_test(run_dir, test_data, test_split)
        test = {"trial": best.number, "data": test_data, "split": test_split, "metrics": metrics, "time": time.time()}
        study.set_user_attr("tests", [*tests, test])
        print(f"[sweep] test split scored once, for trial {best.number}: {json.dumps(metrics)}", flush=True)
    from mm_ptft import checkpoint as ckpt

    cfg = best_config(base, overrides, space, best.params, f"{out.name}-best")
    write_best_yaml(out / BEST_YAML, cfg, best, metric, test)
    ckpt.atomic_write_text(out / TEST_JSON, json.dumps(test, indent=1) + "\n")
    return best, test, [out / BEST_YAML, out / TEST_JSON]


# ---------------------------------------------------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------------------------------------------------


def run_sweep(
    base: str | Path,
    space_path: str | Path,
    out: str | Path,
    *,
    trials: int | None = None,
    timeout_min: float | None = None,
    ranks: int = 1,
    launcher: str = "torchrun",
    overrides: list[str] | None = None,
    test_data: str | None = None,
    test_split: str = "test",
    poll_s: float = 1.0,
) -> SweepResult:
    """Run (or resume) a budgeted strategy search; see the module docstring.

    Args:
        base: the fine-tuning config every trial starts from (``mm-ptft train -c`` of it must work).
        space_path: the search space (:mod:`mm_ptft.sweep.space`).
        out: the sweep's directory (study, trials, best.yaml, report).
        trials: finished trials to reach, over every start of the sweep (None: no limit).
        timeout_min: the sweep's wall time, over every start (None: no limit); at least one budget is needed.
        ranks: ranks per trial (> 1: under ``launcher``, ``torchrun`` or ``deepspeed``).
        overrides: dotted overrides of the base config, for every trial (and the best recipe).
        test_data: held-out test data (default: the base's ``eval.data``), scored once for the chosen config.
        test_split: its split.
        poll_s: how often a running trial's ``metrics.jsonl`` is read.

    Raises:
        SweepError, ConfigError, DataError: one line, before any trial starts (bad space, base config, data).
    """
    from mm_ptft.sweep.report import write_report
    from mm_ptft.tasks import configure_task

    base, out, overrides = Path(base), Path(out), list(overrides or [])
    if trials is None and timeout_min is None:
        raise SweepError("sweep: give a budget: a number of trials and/or a wall time in minutes")
    if trials is not None and trials < 1:
        raise SweepError("sweep: the trial budget must be >= 1")
    if timeout_min is not None and timeout_min <= 0:
        raise SweepError("sweep: the time budget must be > 0 minutes")
    if ranks < 1:
        raise SweepError("sweep: ranks must be >= 1")
    for item in overrides:
        key = item.split("=", 1)[0]
        if key in SWEEP_SETS:
            raise SweepError(f"sweep: {key} is set by the sweep (trial runs go to OUT/trials/<number>); drop {item}")
    space = load_space(space_path)
    try:
        cfg = configure_task(load_config(base, overrides))
    except ConfigError as e:
        raise SweepError(f"sweep: base config {base}: {str(e).removeprefix('config: ')}") from None
    space.check_against(base, overrides)
    test_data = test_data or cfg.eval.data or ""
    _check_base(cfg, test_data, test_split)
    _check_data(cfg, test_data, test_split)
    metric = cfg.eval.select_metric
    if not cfg.eval.every:
        print("[sweep] warning: eval.every=0: trials are evaluated only at their end, so nothing can be pruned")

    trials_dir = (out / TRIALS_DIR).resolve()
    load_config(base, [*overrides, *_trial_overrides(trials_dir, 0)])  # what the sweep adds fits the schema too
    out.mkdir(parents=True, exist_ok=True)
    direction = "maximize" if cfg.eval.select_mode == "max" else "minimize"
    with _lock(out):
        setup = _fingerprint(config_to_dict(cfg), space, ranks)
        study = _open_study(out, space, direction, setup)
        _recover_interrupted(study, trials_dir)
        clock = _Clock(study)
        failures, stopped = 0, ""
        while True:
            done = _finished(study)
            if trials is not None and done >= trials:
                stopped = f"{done} of {trials} trials finished"
                break
            if timeout_min is not None and clock.elapsed() >= timeout_min * 60:
                stopped = f"the time budget is spent ({clock.elapsed() / 60:.1f} of {timeout_min:g} min)"
                break
            study.sampler = space.create_sampler(len(study.get_trials(deepcopy=False)))
            frozen = _run_trial(study, space, base, overrides, metric, trials_dir, ranks, launcher, clock, poll_s)
            failures = failures + 1 if frozen.state.name == "FAIL" else 0
            if failures >= MAX_FAILURES_IN_A_ROW:
                raise SweepError(
                    f"sweep: {failures} trials in a row failed (last: {frozen.user_attrs.get('error')}; "
                    f"log {trials_dir / str(frozen.number) / 'train.log'})"
                )
        clock.save()
        print(f"[sweep] budget: {stopped}", flush=True)
        best, test, files = _finish(out, study, space, base, overrides, metric, test_data, test_split)
        meta = {
            "base": str(base),
            "overrides": overrides,
            "space": str(space_path),
            "metric": metric,
            "direction": direction,
            "ranks": ranks,
            "budget": {"trials": trials, "timeout_min": timeout_min},
            "stopped": stopped,
            "elapsed_min": clock.elapsed() / 60,
        }
        files += write_report(out, study, space, meta, best, test)
    return SweepResult(out, study, best, test, stopped, files)
