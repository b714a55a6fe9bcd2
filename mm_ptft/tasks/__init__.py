"""Tasks: model + loss → ``{"loss": …, metrics}``. The DeepSpeed engine wraps a Task; the Trainer never knows which
loss it trains. A new task is one class registered with ``@TASKS.register(name)`` (see :class:`Task`); this
package imports its own: ``contrastive``, ``classification``, ``text-classification``, ``detection``."""

from mm_ptft.tasks import classification, contrastive, detection  # noqa: F401 - register the tasks
from mm_ptft.tasks.base import (
    OPTIONAL_SECTIONS,
    TASKS,
    Task,
    configure_task,
    create_task,
    for_loading,
    load_trained,
    task_class,
)
from mm_ptft.tasks.classification import ClassificationTask, TextClassificationTask
from mm_ptft.tasks.contrastive import ContrastiveTask
from mm_ptft.tasks.detection import DetectionTask

__all__ = [
    "OPTIONAL_SECTIONS",
    "TASKS",
    "ClassificationTask",
    "ContrastiveTask",
    "DetectionTask",
    "Task",
    "TextClassificationTask",
    "configure_task",
    "create_task",
    "for_loading",
    "load_trained",
    "task_class",
]
