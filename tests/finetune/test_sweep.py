"""``mm-ptft sweep`` on the tiny fine-tune twin: trials are real runs recorded in the study as their logs say, a
pruned trial's processes are stopped, a sweep killed mid-trial resumes without running a finished trial again,
``best.yaml`` is the best trial's config, the test split is scored once, and bad spaces are one-line errors.

The reference for what a trial did is its own ``metrics.jsonl`` and ``config.yaml`` (written by the Trainer in the
child process), never the sweep's bookkeeping.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import CONFIGS, FT_TINY, ROOT, launch_env, one_line_error, records

SPACE_TINY = CONFIGS / "sweep" / "fmnist-tiny-space.yaml"
METRIC = "classification/acc1"


def _get(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return any(_alive(int(p.name)) for p in Path("/proc").iterdir() if p.name.isdigit() and _pgid(p) == pgid)


def _pgid(proc: Path) -> int | None:
    try:
        return int(proc.joinpath("stat").read_text().rsplit(")", 1)[1].split()[2])
    except (OSError, ValueError, IndexError):
        return None


def _wait(predicate, timeout: float, what: str) -> None:
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.2)


def _study(out: Path):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name="sweep", storage=f"sqlite:///{out / 'study.db'}")


@pytest.fixture(scope="module")
def val_data(fmnist_tiny, tmp_path_factory) -> Path:
    """The tiny train split as train (80 %) + a class-stratified val split (20 %), as `data_tools subset
    --holdout` makes them; the tiny set's own test split stays the held-out test."""
    from data_tools.subset import write_subset

    out = tmp_path_factory.mktemp("sweep-data") / "fmnist-val"
    write_subset(fmnist_tiny, out, 1.0, 0.2, "train", 0, shard_size=100, overwrite=True)
    return out


def sweep_argv(out: Path, space: Path, pretrained: Path, val: Path, test: Path, *extra: str) -> list[str]:
    return [
        "sweep",
        "-c", str(FT_TINY),
        "--space", str(space),
        "--out", str(out),
        "--test-data", str(test),
        "--poll-s", "0.2",
        *extra,
        f"finetune.init={pretrained}",
        f"data.train={val}",
        f"eval.data={val}",
        "eval.split=val",
        "eval.every=2",
        "train.report=false",
        "train.tensorboard=false",
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: one line, before any trial
# ---------------------------------------------------------------------------------------------------------------------

GOOD = {"finetune.policy": {"choices": ["last-n", "full"]}, "optim.lr": {"type": "float", "low": 1e-3, "high": 1e-2}}
BAD_SPACES = {
    "unknown-key": ({"params": {**GOOD, "optim.lrr": {"type": "float", "low": 0.1, "high": 0.2}}}, [], "'optim.lrr'"),
    "empty": ({"params": {}}, [], "the space is empty"),
    "no-params": ({"pruner": {"name": "median"}}, [], "the space is empty"),
    "policy-not-in-choices": (
        {"params": {**GOOD, "finetune.lora.rank": {"choices": [4, 8], "when": {"finetune.policy": "lora"}}}},
        [],
        "finetune.policy=lora, which is not one of finetune.policy's choices (last-n, full)",
    ),
    "condition-not-in-space": (
        {
            "params": {
                "optim.layer_decay": {"type": "float", "low": 0.5, "high": 1, "when": {"finetune.policy": "full"}}
            }
        },
        [],
        "not another categorical parameter of the space",
    ),
    "conditions-in-a-loop": (
        {
            "params": {
                "optim.warmup_steps": {"choices": [0, 2], "when": {"train.log_every": 1}},
                "train.log_every": {"choices": [1, 2], "when": {"optim.warmup_steps": 0}},
            }
        },
        [],
        "depend on each other in a loop",
    ),
    "no-select-metric": ({"params": GOOD}, ["eval.select_metric=null"], "no eval.select_metric"),
    "select-metric-of-no-evaluator": ({"params": GOOD}, ["eval.select_metric=zeroshot/acc1"], "names no evaluator"),
    "value-the-task-refuses": (
        {
            "params": {
                **GOOD,
                "finetune.unlocked_groups": {"type": "int", "low": 0, "high": 2, "when": {"finetune.policy": "last-n"}},
            }
        },
        [],
        "finetune.unlocked_groups=0: finetune.unlocked_groups must be >= 1 for last-n",
    ),
    "wrong-type": ({"params": {"finetune.policy": {"choices": ["full", "everything"]}}}, [], "'everything'"),
    "owned-override": ({"params": GOOD}, ["train.name=mine"], "train.name is set by the sweep"),
    "owned-key": ({"params": {"eval.split": {"choices": ["val", "test"]}}}, [], "the sweep sets eval.split"),
    "bad-range": ({"params": {"optim.lr": {"type": "float", "low": 0.0, "high": 1e-2, "log": True}}}, [], "low > 0"),
    "bad-pruner-setting": ({"params": GOOD, "pruner": {"name": "median", "patience": 3}}, [], "no setting 'patience'"),
    "unknown-pruner": ({"params": GOOD, "pruner": {"name": "asha"}}, [], "pruner 'asha' is not one of"),
}


@pytest.mark.parametrize("name", list(BAD_SPACES))
def test_a_bad_space_is_a_one_line_error_before_any_trial(name, tmp_path, capsys):
    from mm_ptft.cli import main

    space, overrides, expected = BAD_SPACES[name]
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    out = tmp_path / "sweep"
    argv = ["sweep", "-c", str(FT_TINY), "--space", str(path), "--out", str(out), "--trials", "2", *overrides]
    assert main(argv) == 2
    err = one_line_error(capsys)
    assert err.startswith("error: ") and expected in err, err
    assert not (out / "trials").exists() and not (out / "study.db").exists()


def test_the_example_spaces_fit_their_recipes():
    """Every choice and both ends of every range of the shipped spaces make a config their recipe's task accepts."""
    from mm_ptft.sweep import load_space

    load_space(SPACE_TINY).check_against(FT_TINY, [])
    cnn = load_space(CONFIGS / "sweep" / "fmnist-cnn-space.yaml")
    cnn.check_against(CONFIGS / "finetune" / "fmnist-cnn-full.yaml", [])
    assert {p.key for p in cnn.params} >= {"finetune.policy", "optim.lr", "train.steps", "finetune.lora.rank"}
    labels = load_space(CONFIGS / "sweep" / "fmnist-cnn-labels-space.yaml")
    labels.check_against(CONFIGS / "finetune" / "fmnist-cnn-full.yaml", ["model.image.image_size=48"])
    assert {p.key for p in labels.params} >= {"finetune.policy", "finetune.head_init", "optim.lr", "train.steps"}


def test_trial_commands_for_one_and_n_ranks():
    from mm_ptft.sweep.trial import trial_command

    one = trial_command("base.yaml", ["optim.lr=0.01"])
    assert one == [sys.executable, "-m", "mm_ptft", "train", "--config", "base.yaml", "optim.lr=0.01"]
    torchrun = trial_command("base.yaml", ["optim.lr=0.01"], ranks=2, launcher="torchrun")
    assert torchrun[1:5] == ["-m", "torch.distributed.run", "--nproc-per-node", "2"]
    assert torchrun[-6:] == ["-m", "mm_ptft", "train", "--config", "base.yaml", "optim.lr=0.01"]
    deepspeed = trial_command("base.yaml", ["optim.lr=0.01"], ranks=2, launcher="deepspeed")
    assert Path(deepspeed[0]).name == "deepspeed" and deepspeed[1:3] == ["--num_gpus", "2"]
    assert deepspeed[-6:] == ["--module", "mm_ptft", "train", "--config", "base.yaml", "optim.lr=0.01"]


def test_parameter_values_survive_the_override_round_trip():
    """What a trial runs with is exactly what the study records (floats keep every digit through YAML 1.1)."""
    from mm_ptft.config import parse_override
    from mm_ptft.sweep.space import format_value

    for value in (1e-05, 0.00422463807424846, 3.0e-4, 2, "last-n", True, None, 1.5e20):
        assert parse_override(f"k={format_value(value)}")[1] == value


# ---------------------------------------------------------------------------------------------------------------------
# Pruning stops the trial's processes
# ---------------------------------------------------------------------------------------------------------------------


def test_a_pruned_trial_is_stopped_mid_run(tmp_path, pretrained, val_data, fmnist_tiny):
    """A pruner that prunes at the first report (threshold above any accuracy): the run, 2 ranks under torchrun and
    400 steps long, is stopped at its step-0 evaluation, its whole process group (launcher and ranks) is gone, and it
    never reached its end."""
    from mm_ptft.cli import main

    space = tmp_path / "space.yaml"
    space.write_text(
        yaml.safe_dump(
            {
                "params": {"finetune.policy": {"choices": ["full"]}, "train.steps": {"choices": [400]}},
                "pruner": {"name": "threshold", "lower": 2.0},
            }
        )
    )
    out = tmp_path / "sweep"
    t0 = time.monotonic()
    assert main(sweep_argv(out, space, pretrained, val_data, fmnist_tiny, "--trials", "1", "--ranks", "2")) == 0
    assert time.monotonic() - t0 < 90
    (trial,) = _study(out).trials
    assert trial.state.name == "PRUNED" and trial.user_attrs["pruned_at"] == 0
    logged = records(out / "trials" / "0")
    assert trial.intermediate_values == {0: records(out / "trials" / "0", "eval")[0][METRIC]}
    assert "summary" not in {r["kind"] for r in logged} and max(r.get("step", 0) for r in logged) < 400
    assert not _group_alive(trial.user_attrs["pid"])
    assert "torch.distributed.run --nproc-per-node 2" in (out / "trials" / "0" / "train.log").read_text()
    assert not (out / "best.yaml").exists() and not (out / "test.json").exists()  # nothing completed, nothing tested
    assert "PRUNED" in (out / "report.md").read_text()


# ---------------------------------------------------------------------------------------------------------------------
# A sweep killed mid-trial, resumed by the same command
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def swept(tmp_path_factory, pretrained, val_data, fmnist_tiny):
    """Start a 3-trial sweep as its own process, SIGKILL it once trial 0 has finished and trial 1 is running, then
    run the same command in this process (it resumes), once more (nothing left to do), and with more trials but a
    spent time budget. Test evaluations are counted by wrapping the evaluation function every scorer calls."""
    from mm_ptft import eval as evaluation
    from mm_ptft.cli import main

    out = tmp_path_factory.mktemp("sweep") / "sweep"
    argv = sweep_argv(out, SPACE_TINY, pretrained, val_data, fmnist_tiny, "--trials", "3")
    log = out.parent / "first.log"
    with log.open("w") as f:
        first = subprocess.Popen(
            [sys.executable, "-m", "mm_ptft", *argv], cwd=ROOT, env=launch_env(), stdout=f, stderr=subprocess.STDOUT
        )
    try:
        _wait(lambda: (out / "trials" / "1" / "train.log").is_file() or first.poll() is not None, 240, "trial 1")
        assert first.poll() is None, log.read_text()[-3000:]
        _wait(lambda: "pid" in _study(out).trials[1].user_attrs, 30, "trial 1's pid in the study")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    before = _study(out).trials  # a snapshot (FrozenTrial copies)
    interrupted = before[1]
    assert interrupted.state.name == "RUNNING"
    _wait(lambda: not _alive(interrupted.user_attrs["pid"]), 30, "the killed sweep's trial to end with it")
    trial1 = out / "trials" / "1"
    assert not (trial1 / "metrics.jsonl").is_file() or not records(trial1, "summary")  # ended with it, unfinished
    trial0_log = (out / "trials" / "0" / "metrics.jsonl").read_bytes()

    scored = []
    original = evaluation.evaluate_model

    def counting(cfg, *args, **kwargs):
        scored.append((cfg.eval.data, cfg.eval.split))
        return original(cfg, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(evaluation, "evaluate_model", counting)
        assert main(argv) == 0  # resumes
        after_resume = len(_study(out).trials)
        assert main(argv) == 0  # the budget is spent: no trial, no second test evaluation
        # more trials allowed, but the time budget (over every start) is long spent
        more = sweep_argv(out, SPACE_TINY, pretrained, val_data, fmnist_tiny, "--trials", "10", "--timeout-min", "0.01")
        assert main(more) == 0
    return {
        "out": out,
        "before": before,
        "interrupted": interrupted,
        "trial0_log": trial0_log,
        "scored": scored,
        "after_resume": after_resume,
        "test": str(fmnist_tiny),
    }


def test_trials_are_real_runs_recorded_as_their_logs_say(swept):
    study = _study(swept["out"])
    counted = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED", "FAIL") and t.number != 1]
    assert len(counted) == 3 and all(t.state.name in ("COMPLETE", "PRUNED") for t in counted)
    for t in counted:
        run = Path(t.user_attrs["run_dir"])
        assert run == swept["out"].resolve() / "trials" / str(t.number)
        evals = [r for r in records(run, "eval") if METRIC in r]
        reported = {r["step"]: r[METRIC] for r in evals[: len(t.intermediate_values)]}
        assert t.intermediate_values == reported  # what the run logged, step by step
        assert t.state.name == "PRUNED" or len(reported) == len(evals)  # a finished run: every evaluation
        saved = yaml.safe_load((run / "config.yaml").read_text())
        assert saved["eval"]["split"] == "val"  # trials never see the test split
        for key, value in t.params.items():
            node = saved
            for part in key.split("."):
                node = node[part]
            assert node == value, (t.number, key)
        if t.state.name == "COMPLETE":
            assert t.value == max(r[METRIC] for r in evals) == records(run, "summary")[-1][f"best/{METRIC}"]
            assert (run / "best.safetensors").is_file()
        else:
            assert records(run, "summary") == [] and max(t.intermediate_values) == t.user_attrs["pruned_at"]
    report = (swept["out"] / "report.md").read_text()
    assert all(f"\n| {t.number} | {t.state.name} |" in report for t in study.trials)
    for name in ("values.png", "curves.png"):
        assert (swept["out"] / "plots" / name).read_bytes()[:4] == b"\x89PNG"


def test_a_killed_sweep_resumes_without_repeating_finished_trials(swept):
    study = _study(swept["out"])
    states = [t.state.name for t in study.trials]
    assert swept["before"][0].state.name in ("COMPLETE", "PRUNED")
    assert states[0] == swept["before"][0].state.name and states[1] == "FAIL"  # left RUNNING: marked FAIL
    requeued = [t for t in study.trials if t.user_attrs.get("requeued_from") == 1]
    assert [t.number for t in requeued] == [2] and requeued[0].params == swept["interrupted"].params
    assert len(study.trials) == 4 == swept["after_resume"]  # 0, the interrupted 1, its re-run 2, a new 3
    assert (swept["out"] / "trials" / "0" / "metrics.jsonl").read_bytes() == swept["trial0_log"]  # not run again
    assert sorted(p.name for p in (swept["out"] / "trials").iterdir()) == ["0", "1", "2", "3"]
    assert study.user_attrs["elapsed_s"] > 0.01 * 60
    assert "stopped: the time budget is spent" in (swept["out"] / "report.md").read_text()


def test_best_yaml_is_the_best_trials_config(swept):
    from mm_ptft.config import load_config

    study = _study(swept["out"])
    best = study.best_trial
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert best.value == max(t.value for t in complete)
    cfg = load_config(swept["out"] / "best.yaml")  # what `mm-ptft train -c OUT/best.yaml` loads
    for key, value in best.params.items():
        assert _get(cfg, key) == value, key
    trial_cfg = yaml.safe_load((Path(best.user_attrs["run_dir"]) / "config.yaml").read_text())
    recipe = yaml.safe_load((swept["out"] / "best.yaml").read_text())
    for section in ("model", "data", "eval", "optim", "deepspeed", "finetune"):
        assert recipe[section] == trial_cfg[section], section
    sweep_set = ("name", "output_dir", "progress", "resume", "consolidate")
    assert {k: v for k, v in recipe["train"].items() if k not in sweep_set} == {
        k: v for k, v in trial_cfg["train"].items() if k not in sweep_set
    }
    assert recipe["train"]["name"] == "sweep-best" and recipe["train"]["progress"] is True


def test_the_test_split_is_scored_once_for_the_chosen_config(swept):
    study = _study(swept["out"])
    assert swept["scored"] == [(swept["test"], "test")]  # one evaluation, over two runs of the command
    test = json.loads((swept["out"] / "test.json").read_text())
    assert test["trial"] == study.best_trial.number and study.user_attrs["tests"] == [test]
    assert test["metrics"]["classification/n"] == 600  # the whole test split
    assert f"{test['metrics'][METRIC]:.4f}" in (swept["out"] / "report.md").read_text()
