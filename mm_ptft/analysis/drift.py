"""Relative weight change ‖θ_B − θ_A‖ / ‖θ_A‖ of a tower, per layer group (embeddings, each block, …)."""

from __future__ import annotations

import math
import re

import torch

_INDEXED = re.compile(r"(?:^|\.)([A-Za-z_]+\d*)\.(\d+)(?:\.|$)")  # blocks.3, layer.0, layer1.0


def group_label(names: list[str], index: int, count: int) -> str:
    """A short readable name for a layer group from its parameter names (``blocks.3``, ``layer.0``, ``norm``)."""
    first = names[0]
    if first.startswith("proj."):
        return "proj"
    match = _INDEXED.search(first)
    if match:
        return f"{match.group(1)}.{match.group(2)}"
    if index == 0:
        return "embed"
    body = first.split(".", 1)[1] if first.startswith(("trunk.", "transformer.")) else first
    return body.rsplit(".", 1)[0] if "." in body else body


def relative_change(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], groups: list[list[str]]) -> list[dict]:
    """Per group: ``relative_change`` = ‖θ_B − θ_A‖₂ / ‖θ_A‖₂ over all its parameters, and its parameter count.

    Args:
        a: the reference (pretrained) tower's state.
        b: the other (fine-tuned) tower's state, same names and shapes.
        groups: parameter names grouped from input to output (a tower's ``layer_groups()``).
    """
    rows = []
    for i, names in enumerate(groups):
        diff2 = sum(float(((b[n].double() - a[n].double()) ** 2).sum()) for n in names)
        norm2 = sum(float((a[n].double() ** 2).sum()) for n in names)
        if norm2 > 0:
            rel = math.sqrt(diff2 / norm2)
        else:
            rel = 0.0 if diff2 == 0 else math.inf
        rows.append(
            {
                "group": group_label(names, i, len(groups)),
                "params": int(sum(a[n].numel() for n in names)),
                "relative_change": rel,
                "abs_change": math.sqrt(diff2),
            }
        )
    return rows
