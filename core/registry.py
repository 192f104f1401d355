"""Plain-dict registries filled by explicit decorators (stages, criteria, datasets)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from core.errors import UserInputError, did_you_mean

T = TypeVar("T")

# The stages in the order they run; each is registered in STAGES (core.context) by its module in stages/.
PIPELINE: list[str] = ["load", "train", "calibrate", "filter_prune", "layer_truncate", "finetune", "export", "validate"]


class Registry(Generic[T]):
    """A named dict whose duplicates raise and whose unknown names list the known ones."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers an object under `name`."""

        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return add

    def put(self, name: str, obj: T) -> None:
        """Set `name` to `obj`, replacing an earlier one: for objects registered at run time (the Python API's
        model and datasets), where the same key comes back when the same call is made again."""
        self._items[name] = obj

    def get(self, name: str) -> T:
        """Look up `name`; an unknown one raises UserInputError listing the known names."""
        if name not in self._items:
            raise UserInputError(
                f"unknown {self.kind} {name!r}.{did_you_mean(name, self._items)} "
                f"Known {self.kind}s: {', '.join(sorted(self._items))}."
            )
        return self._items[name]

    def names(self) -> list[str]:
        """Registered names in registration order."""
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)
