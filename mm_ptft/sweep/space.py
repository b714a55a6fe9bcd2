"""The search space of ``mm-ptft sweep``: dotted config keys with ranges, some of them conditional on others.

A space is a YAML file::

    params:                                   # each one a dotted config key
      finetune.policy: {choices: [linear-probe, last-n, full, lora]}
      finetune.unlocked_groups: {type: int, low: 1, high: 4, when: {finetune.policy: last-n}}
      optim.layer_decay: {type: float, low: 0.6, high: 1.0, when: {finetune.policy: full}}
      finetune.lora.rank: {choices: [4, 8, 16], when: {finetune.policy: lora}}
      optim.lr: {type: float, low: 3.0e-4, high: 1.0e-2, log: true}
      train.steps: {type: int, low: 200, high: 1000, step: 100}
    pruner: {name: median, n_startup_trials: 3, n_warmup_steps: 300}    # optional (this is the default's kind)
    sampler: {seed: 0, n_startup_trials: 5}                               # optional: Optuna's TPESampler settings

A parameter with ``when`` is sampled, and set, only in trials where each key it names took one of the listed values
(a value or a list of them); elsewhere the base config's value stands. A condition names another categorical
parameter of the space, with values among its choices; parameters are sampled in file order, each after the ones its
conditions name. :meth:`SearchSpace.check_against` builds the config of every choice and both ends of every range
(with the conditions that enable it) before any trial starts, so an unknown key, a value of the wrong type or a
setting the task refuses is a one-line error naming the parameter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from mm_ptft.config import ConfigError

if TYPE_CHECKING:
    import optuna


class SweepError(ConfigError):
    """A sweep problem a person can fix (a bad space, a missing select_metric, a study made for other settings)."""


# keys the sweep itself sets, or that define what trials are compared on: a space may not vary them
SWEEP_OWNED = (
    "train.output_dir",
    "train.name",
    "train.resume",
    "train.stop_after",
    "eval.data",
    "eval.split",
    "eval.max_samples",
    "eval.select_metric",
    "eval.select_mode",
)
SPACE_KEYS = ("params", "pruner", "sampler")
PARAM_KEYS = ("type", "choices", "low", "high", "step", "log", "when")
DEFAULT_PRUNER = {"name": "median", "n_startup_trials": 3, "n_warmup_steps": 0}
DEFAULT_SAMPLER = {"seed": 0}


def _pruners() -> dict[str, type]:
    import optuna

    return {
        "median": optuna.pruners.MedianPruner,
        "percentile": optuna.pruners.PercentilePruner,
        "successive-halving": optuna.pruners.SuccessiveHalvingPruner,
        "hyperband": optuna.pruners.HyperbandPruner,
        "threshold": optuna.pruners.ThresholdPruner,
        "none": optuna.pruners.NopPruner,
    }


def _number(value: Any, where: str, integer: bool = False) -> int | float:
    if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
        with contextlib.suppress(ValueError):
            value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SweepError(f"{where} must be a number, got {value!r}")
    if integer:
        if value != int(value):
            raise SweepError(f"{where} must be an integer, got {value!r}")
        return int(value)
    return float(value)


def format_value(value: Any) -> str:
    """A parameter value as the right-hand side of a dotted override, read back to the same value (floats keep
    every digit and a dot, so YAML 1.1 reads ``1.0e-05`` as a float)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=math.inf).strip()
    return text.removesuffix("...").strip()


def short_value(value: Any) -> str:
    """A parameter value for people: floats to 4 significant digits (the exact value is in the study)."""
    return f"{value:.4g}" if isinstance(value, float) else format_value(value)


@dataclass(frozen=True)
class Param:
    """One dotted config key and the values a trial may give it."""

    key: str
    kind: Literal["categorical", "int", "float"]
    choices: tuple[Any, ...] = ()
    low: float = 0.0
    high: float = 0.0
    step: float | None = None
    log: bool = False
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()  # (key of a categorical parameter, the values enabling this)

    def active(self, chosen: dict[str, Any]) -> bool:
        """Whether this parameter is set in a trial whose earlier parameters took ``chosen``."""
        return all(key in chosen and chosen[key] in values for key, values in self.when)

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def corners(self) -> list[Any]:
        """The values :meth:`SearchSpace.check_against` builds a config with: every choice, or both ends."""
        if self.kind == "categorical":
            return list(self.choices)
        if self.kind == "int":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]

    def describe(self) -> str:
        """A short human description for the report: ``log-uniform [0.0003, 0.01]``, ``{a, b}``, …"""
        if self.kind == "categorical":
            text = "{" + ", ".join(format_value(c) for c in self.choices) + "}"
        else:
            low, high = (int(self.low), int(self.high)) if self.kind == "int" else (self.low, self.high)
            scale = "log-uniform" if self.log else "uniform"
            step = f", step {format_value(int(self.step) if self.kind == 'int' else self.step)}" if self.step else ""
            text = f"{self.kind} {scale} [{format_value(low)}, {format_value(high)}{step}]"
        if self.when:
            cond = " and ".join(f"{k} in {{{', '.join(format_value(v) for v in vs)}}}" for k, vs in self.when)
            text += f" when {cond}"
        return text

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.kind}
        if self.kind == "categorical":
            out["choices"] = list(self.choices)
        else:
            out.update(low=self.low, high=self.high, step=self.step, log=self.log)
        if self.when:
            out["when"] = {k: list(vs) for k, vs in self.when}
        return out


@dataclass
class SearchSpace:
    """The parameters of a sweep (in sampling order), its pruner and its TPE sampler settings."""

    params: list[Param]
    pruner: dict[str, Any]
    sampler: dict[str, Any]
    source: str = "space"

    # ---------------------------------------------------------------------------------------------- trials
    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """Sample (or, for an enqueued trial, read) the value of every parameter active in this trial."""
        chosen: dict[str, Any] = {}
        for p in self.params:
            if p.active(chosen):
                chosen[p.key] = p.suggest(trial)
        return chosen

    def overrides(self, values: dict[str, Any]) -> list[str]:
        """Dotted overrides ``key=value`` of a trial's parameter values, in the space's order."""
        order = [p.key for p in self.params]
        return [f"{k}={format_value(values[k])}" for k in sorted(values, key=order.index)]

    def group_key(self) -> str | None:
        """The parameter trials are grouped by in the report's per-policy view: ``finetune.policy`` when it is
        searched, else the first unconditional categorical parameter."""
        keys = [p.key for p in self.params if p.kind == "categorical" and not p.when]
        return "finetune.policy" if "finetune.policy" in keys else (keys[0] if keys else None)

    def create_pruner(self) -> optuna.pruners.BasePruner:
        settings = dict(self.pruner)
        return _pruners()[settings.pop("name")](**settings)

    def create_sampler(self, offset: int) -> optuna.samplers.BaseSampler:
        """TPE seeded with ``sampler.seed + offset``: each trial gets its own seed (the number of trials before it),
        so what is sampled is a function of the seed and the study's history, the same whether or not the sweep
        was interrupted, and a resumed sweep never replays the draws of its first start."""
        import optuna

        settings = dict(self.sampler)
        seed = settings.pop("seed", 0)
        return optuna.samplers.TPESampler(seed=None if seed is None else seed + offset, **settings)

    def to_dict(self) -> dict[str, Any]:
        """Plain data of the whole space (what a study remembers, to refuse a resume with another space)."""
        return {"params": {p.key: p.to_dict() for p in self.params}, "pruner": self.pruner, "sampler": self.sampler}

    # ------------------------------------------------------------------------------------------ validation
    def check_against(self, base: str | Path, overrides: list[str]) -> None:
        """Build the config of every choice and both ends of every range (each with the conditions that enable it)
        from ``base`` + ``overrides``; the task's own checks included.

        Raises:
            SweepError: one line naming the parameter, its value and what the config said.
        """
        from mm_ptft.config import load_config
        from mm_ptft.tasks import configure_task

        for p in self.params:
            for value in p.corners():
                assignment = {**self._enabling(p), p.key: value}
                try:
                    configure_task(load_config(base, [*overrides, *self.overrides(assignment)]))
                except ConfigError as e:
                    reason = str(e).removeprefix("config: ")
                    raise SweepError(f"sweep: {self.source}: {p.key}={format_value(value)}: {reason}") from None

    def _enabling(self, p: Param) -> dict[str, Any]:
        """Values of the earlier parameters that switch ``p`` on (the first allowed value of each condition)."""
        by_key = {q.key: q for q in self.params}
        out: dict[str, Any] = {}
        for key, values in p.when:
            out.update(self._enabling(by_key[key]))
            out[key] = values[0]
        return out


def _param(key: str, spec: Any, where: str) -> Param:
    """A parameter without its condition (conditions are resolved once every parameter is known)."""
    where = f"{where}: parameter {key}"
    if not isinstance(spec, dict):
        raise SweepError(f"{where} must be a mapping (choices: [...] or type: int|float with low/high), got {spec!r}")
    unknown = sorted(set(spec) - set(PARAM_KEYS))
    if unknown:
        raise SweepError(f"{where}: unknown setting '{unknown[0]}'; valid: {', '.join(PARAM_KEYS)}")
    if key in SWEEP_OWNED:
        raise SweepError(f"{where}: the sweep sets {key} itself (or compares trials on it); it cannot be searched")
    kind = spec.get("type", "categorical" if "choices" in spec else None)
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise SweepError(f"{where}: choices must be a non-empty list")
        if any(c is not None and not isinstance(c, (bool, int, float, str)) for c in choices):
            raise SweepError(f"{where}: choices must be scalars (numbers, strings, true/false, null)")
        if len(set(map(repr, choices))) != len(choices):
            raise SweepError(f"{where}: choices repeat a value")
        extra = sorted(set(spec) & {"low", "high", "step", "log"})
        if extra:
            raise SweepError(f"{where}: '{extra[0]}' is for int / float ranges, not choices")
        return Param(key, "categorical", choices=tuple(choices))
    if kind not in ("int", "float"):
        raise SweepError(f"{where}: type must be int, float or categorical (choices: [...]), got {kind!r}")
    if "choices" in spec:
        raise SweepError(f"{where}: choices are for categorical parameters (drop type: {kind})")
    integer = kind == "int"
    if "low" not in spec or "high" not in spec:
        raise SweepError(f"{where}: a {kind} range needs low and high")
    low, high = _number(spec["low"], f"{where}: low", integer), _number(spec["high"], f"{where}: high", integer)
    step = None if spec.get("step") is None else _number(spec["step"], f"{where}: step", integer)
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise SweepError(f"{where}: log must be true or false")
    if not low < high:
        raise SweepError(f"{where}: low ({low}) must be below high ({high})")
    if log and low <= 0:
        raise SweepError(f"{where}: a log range needs low > 0")
    if log and step is not None:
        raise SweepError(f"{where}: give step or log, not both")
    if step is not None and step <= 0:
        raise SweepError(f"{where}: step must be > 0")
    return Param(key, kind, low=low, high=high, step=step, log=log)


def _conditions(key: str, when: Any, params: dict[str, Param], where: str) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    where = f"{where}: parameter {key}"
    if when is None:
        return ()
    if not isinstance(when, dict) or not when:
        raise SweepError(f"{where}: when must map parameter keys to a value or a list of values")
    out = []
    for parent_key, values in when.items():
        values = values if isinstance(values, list) else [values]
        parent = params.get(parent_key)
        if parent is None or parent.kind != "categorical" or parent_key == key:
            listed = ", ".join(k for k, q in params.items() if q.kind == "categorical" and k != key) or "none"
            raise SweepError(
                f"{where}: when names {parent_key}, which is not another categorical parameter of the space "
                f"(categorical parameters: {listed})"
            )
        missing = [v for v in values if v not in parent.choices or isinstance(v, bool) != _is_bool_choice(parent, v)]
        if missing or not values:
            shown = ", ".join(format_value(c) for c in parent.choices)
            raise SweepError(
                f"{where}: when {parent_key}={format_value(missing[0] if missing else values)}, which is not one "
                f"of {parent_key}'s choices ({shown})"
            )
        out.append((parent_key, tuple(values)))
    return tuple(out)


def _sampling_order(params: list[Param], where: str) -> list[Param]:
    """The parameters in file order, moved behind the parameters their conditions name (conditions form no loop)."""
    placed: list[Param] = []
    waiting = list(params)
    while waiting:
        ready = next((p for p in waiting if all(k in {q.key for q in placed} for k, _ in p.when)), None)
        if ready is None:
            loop = ", ".join(p.key for p in waiting)
            raise SweepError(f"{where}: the when conditions of {loop} depend on each other in a loop")
        placed.append(ready)
        waiting.remove(ready)
    return placed


def _is_bool_choice(parent: Param, value: Any) -> bool:
    return any(isinstance(c, bool) and c == value for c in parent.choices)


def _settings(name: str, spec: Any, default: dict[str, Any], where: str) -> dict[str, Any]:
    if spec is None:
        return dict(default)
    if not isinstance(spec, dict):
        raise SweepError(f"{where}: {name} must be a mapping of settings")
    return dict(spec)


def _check_pruner(settings: dict[str, Any], where: str) -> dict[str, Any]:
    settings = {"name": DEFAULT_PRUNER["name"], **settings}
    pruners = _pruners()
    name = settings["name"]
    if name not in pruners:
        raise SweepError(f"{where}: pruner '{name}' is not one of {', '.join(pruners)}")
    _check_kwargs(pruners[name], {k: v for k, v in settings.items() if k != "name"}, f"{where}: pruner '{name}'")
    return settings


def _check_kwargs(cls: type, kwargs: dict[str, Any], where: str) -> None:
    signature = inspect.signature(cls)
    try:
        signature.bind(**kwargs)
    except TypeError:
        valid = ", ".join(signature.parameters) or "none"
        bad = next((k for k in kwargs if k not in signature.parameters), next(iter(kwargs), "?"))
        raise SweepError(f"{where} takes no setting '{bad}'; its settings: {valid}") from None


def load_space(path: str | Path) -> SearchSpace:
    """Read and check a space file (structure only; :meth:`SearchSpace.check_against` checks it against a config).

    Raises:
        SweepError: a missing or unreadable file, no parameters, an unknown setting, a bad range, a condition on a
            parameter or value that is not in the space, an unknown pruner or sampler setting.
    """
    import optuna

    path = Path(path)
    where = f"sweep: {path}"
    if not path.is_file():
        raise SweepError(f"{where}: space file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise SweepError(f"{where} is not valid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise SweepError(f"{where} must hold a mapping (params:, and optionally pruner: and sampler:)")
    unknown = sorted(set(data) - set(SPACE_KEYS))
    if unknown:
        raise SweepError(f"{where}: unknown section '{unknown[0]}'; valid: {', '.join(SPACE_KEYS)}")
    raw = data.get("params")
    if not raw:
        raise SweepError(f"{where}: the space is empty (params: lists no parameter to search)")
    if not isinstance(raw, dict):
        raise SweepError(f"{where}: params must map dotted config keys to their ranges")
    params = {str(key): _param(str(key), spec, where) for key, spec in raw.items()}
    params = {
        key: dataclasses.replace(p, when=_conditions(key, raw[key].get("when"), params, where))
        for key, p in params.items()
    }
    pruner = _check_pruner(_settings("pruner", data.get("pruner"), DEFAULT_PRUNER, where), where)
    sampler = _settings("sampler", data.get("sampler"), DEFAULT_SAMPLER, where)
    _check_kwargs(optuna.samplers.TPESampler, sampler, f"{where}: sampler (TPE)")
    return SearchSpace(_sampling_order(list(params.values()), where), pruner, sampler, source=str(path))
