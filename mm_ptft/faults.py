"""Fault injection for reliability tests: kill this process at a named point of the Trainer.

Set ``MM_PTFT_FAULT=<point>:<step>[:<rank>]`` (e.g. ``mid_save:6:1``) and the process SIGKILLs itself when it
reaches ``point`` at optimizer step ``step`` (on ``rank`` only, when given): exactly what a pre-empted node, an OOM
kill or a `kill -9` does, at a moment a test could not reliably hit from outside. Points: ``step`` (the step's update
applied and any checkpoint of that step published), ``mid_save`` (DeepSpeed's files written, mm-ptft's per-rank state
not yet), ``before_publish`` (all files written, ``latest`` not moved).
Unset (the default), this module does nothing.
"""

from __future__ import annotations

import os
import signal

ENV = "MM_PTFT_FAULT"


def maybe_fail(point: str, step: int, rank: int) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    parts = spec.split(":")
    if parts[0] != point or int(parts[1]) != step:
        return
    if len(parts) > 2 and int(parts[2]) != rank:
        return
    os.kill(os.getpid(), signal.SIGKILL)
