"""Tasks: model + loss → ``{"loss": …, metrics}``. The DeepSpeed engine wraps a Task; the Trainer never knows
which loss it trains. New tasks register a builder ``fn(cfg, rank, world_size) -> Task`` in ``TASKS``."""

import mm_ptft.finetune.detection.task  # noqa: F401 - registers detection
import mm_ptft.finetune.tasks  # noqa: F401 - registers classification, text-classification
from mm_ptft.tasks.base import TASKS, Task, create_task
from mm_ptft.tasks.contrastive import ContrastiveTask

__all__ = ["TASKS", "ContrastiveTask", "Task", "create_task"]
