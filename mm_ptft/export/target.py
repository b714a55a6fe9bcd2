"""Export targets as registered objects: each says whether it can export a given model (and why not), and exports.

A new format is one subclass registered with ``@register_target``, in a module :mod:`mm_ptft.export` imports.
"""

from __future__ import annotations

import abc
from pathlib import Path

from mm_ptft.export.source import ExportSource
from mm_ptft.registry import Registry


class ExportTarget(abc.ABC):
    """One export format, written under ``<out>/<name>/``."""

    name: str = ""
    tower: str = "image"  # the tower a checkpoint must hold for this target: 'image' or 'text'

    def unavailable(self, src: ExportSource) -> str | None:
        """Why this target cannot export ``src`` (one clause), or None when it can."""
        held = src.has_image if self.tower == "image" else src.has_text
        return None if held else f"the checkpoint holds no {self.tower} tower"

    @abc.abstractmethod
    def export(self, src: ExportSource, work: Path, final: Path, verify: bool, opset: int | None) -> dict:
        """Write the export into ``work`` (which becomes ``final`` once every target succeeded); returns what was
        written and the largest difference of each checked output."""


TARGETS: Registry[ExportTarget] = Registry("export target")


def register_target(cls: type[ExportTarget]) -> type[ExportTarget]:
    """Class decorator: register one instance of ``cls`` under ``cls.name``."""
    TARGETS.register(cls.name)(cls())
    return cls
