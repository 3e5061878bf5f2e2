"""The pluggable map that fans independent per-model work out (serial here, Ray on the server)."""

from __future__ import annotations

from typing import Callable, Protocol, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class ParallelMap(Protocol):
    """``pmap(fn, items)`` returns ``[fn(x) for x in items]`` in order, computed anywhere."""

    def __call__(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]: ...


def serial_map(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """Default map: in process, in order."""
    return [fn(x) for x in items]
