"""Rank-0 metrics sinks: ``metrics.jsonl`` (read by the report) and TensorBoard."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path


class MetricsLogger:
    """Appends one JSON object per record to ``run_dir/metrics.jsonl`` and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, enabled: bool = True):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, kind: str, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": time.time()}
        record.update({k: _plain(v) for k, v in metrics.items()})
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if k not in ("kind", "step", "time") and isinstance(v, (int, float)) and math.isfinite(v):
                    self.writer.add_scalar(k if "/" in k else f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else v
    return v
