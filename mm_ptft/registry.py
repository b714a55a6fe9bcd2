"""One small registry idiom, reused for towers, losses, tasks and evaluators (timm's ``register_model`` habit)."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Name → factory table with a decorator to add entries and a clear error for unknown names.

    Example:
        >>> LOSSES = Registry("loss")
        >>> @LOSSES.register("clip")
        ... class ClipLoss: ...
        >>> LOSSES.create("clip")
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def decorator(fn: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries and self._entries[name] is not fn:
                raise KeyError(f"{self.kind} '{name}' is already registered")
            self._entries[name] = fn
            return fn

        return decorator

    def get(self, name: str) -> Callable[..., T]:
        if name not in self._entries:
            raise KeyError(f"unknown {self.kind} '{name}'; registered: {', '.join(sorted(self._entries)) or 'none'}")
        return self._entries[name]

    def create(self, name: str, *args: Any, **kwargs: Any) -> T:
        return self.get(name)(*args, **kwargs)

    def list(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: str) -> bool:
        return name in self._entries
