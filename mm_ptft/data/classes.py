"""Class names, zero-shot templates and labels: read once, checked once, for every task and evaluator.

Class names and templates come from the config (a list, or a file with one per line) or from a dataset's
``dataset.json`` (``classnames``, ``templates``). Labels index the class list, so a repeated name or a label outside
the list is a one-line error naming where it came from.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mm_ptft.config import ConfigError
from mm_ptft.data.shards import DataError


def read_lines_or_list(value: list[str] | str | None, what: str) -> list[str] | None:
    """A list from the config, or the non-empty lines of the file it names (``what`` names the key in errors)."""
    if value is None or isinstance(value, list):
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(f"config: {what} file not found: {path}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def check_unique(names: list[str], what: str) -> None:
    """Refuse a class list with a repeated name (a duplicate would make two labels one class)."""
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise ConfigError(f"config: duplicate class name '{name}' in {what} (entries {seen[name]} and {i})")
        seen[name] = i


def check_templates(templates: list[str], what: str) -> None:
    for t in templates:
        if "{}" not in t and "{c}" not in t:
            raise ConfigError(f"config: template '{t}' in {what} has no '{{}}' for the class name")


def resolve_classes(
    sources: list[tuple[list[str] | str | None, str]], templates: list[str] | str | None, metas: list[tuple[dict, str]]
) -> tuple[list[str] | None, list[str] | None]:
    """(class names, templates): the first config source that gives names, else the first dataset.json that does.

    Args:
        sources: ``(config value, its key)`` pairs, in order of precedence (e.g. ``finetune.classnames`` first).
        templates: ``eval.templates`` (list or file); None → the first dataset.json that lists templates.
        metas: ``(dataset.json content, where it came from)`` pairs, in order of precedence.

    Raises:
        ConfigError: a missing file, a duplicated class name or a template without ``{}`` (naming its source).
    """
    names, where = None, ""
    for value, key in sources:
        names = read_lines_or_list(value, key)
        if names:
            where = key if not isinstance(value, str) else f"{key} ({value})"
            break
    texts = read_lines_or_list(templates, "eval.templates")
    template_where = "eval.templates"
    for meta, origin in metas:
        if not names and meta.get("classnames"):
            names, where = list(meta["classnames"]), origin
        if not texts and meta.get("templates"):
            texts, template_where = list(meta["templates"]), origin
    if names:
        check_unique(names, where)
    if texts:
        check_templates(texts, template_where)
    return names, texts


def check_labels(labels: torch.Tensor, num_classes: int, what: str = "", keys: list[str] | None = None) -> None:
    """Every label must index the class list; -1 (no ``label`` in the sample's json) is refused too.

    Args:
        labels: (N,) labels.
        num_classes: length of the class list.
        what: which data, for the message (``"held-out"``, ``"train"``; empty for training batches).
        keys: the samples' keys, to name the first offending one.

    Raises:
        DataError: one line, naming the label, the sample (when ``keys`` are given) and the class count.
    """
    if labels.numel() == 0:
        return
    bad = (labels < 0) | (labels >= num_classes)
    if not bad.any():
        return
    i = int(bad.nonzero()[0])
    label = int(labels[i])
    data = f"{what} " if what else ""
    sample = f" of sample '{keys[i]}'" if keys is not None else ""
    if label < 0:
        who = f"{data}sample '{keys[i]}'" if keys is not None else f"a {data}sample"
        raise DataError(f"data: {who} has no label (json 'label'); classification needs one per sample")
    raise DataError(f"data: {data}label {label}{sample} is outside the {num_classes} classes")
