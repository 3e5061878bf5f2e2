"""Ray as the fit's parallel map: join a cluster, reuse a simulation's Ray, or start one.

* Inside a Flower simulation Ray is already running and Flower's client actors hold every CPU:
  tasks ask for ``num_cpus=0`` so they never wait behind those actors.
* With ``RAY_ADDRESS`` set (a cluster started with ``ray start --head``), join it.
* Otherwise start a local Ray sized to this machine.

Small batches stay in process: shipping a few tiny assignment problems to workers costs more
than solving them. Measured on 2 cores (benchmarks/perf.py): one alignment round of 200 models
takes 0.04 s in process and 1.3 s over Ray; of 5,000 models 0.99 s vs 0.67 s. Hence the default
threshold of 32 chunks (about 2,000 models at the fit's 64 per chunk).
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Sequence, TypeVar

from fedfuse.parallel import serial_map

T = TypeVar("T")
R = TypeVar("R")
log = logging.getLogger(__name__)


class RayMap:
    """``RayMap()(fn, items)``: one Ray task per item (each item is a chunk of models)."""

    def __init__(self, address: str | None = None, min_items: int = 32, force: bool = False) -> None:
        self.address = address if address is not None else os.environ.get("RAY_ADDRESS")
        self.min_items = min_items
        self.force = force
        self._task_cpus: float | None = None

    def _ensure_ray(self) -> None:
        import ray

        if self._task_cpus is not None and ray.is_initialized():
            return
        if ray.is_initialized():
            self._task_cpus = 0  # a Flower simulation's Ray: its actors hold every CPU
            log.info("using the running Ray instance (tasks with num_cpus=0)")
        elif self.address and self.address != "local":
            ray.init(address=self.address, log_to_driver=False)
            self._task_cpus = 1
            log.info("joined Ray cluster at %s", self.address)
        else:
            ray.init(address="local", include_dashboard=False, log_to_driver=False,
                     num_cpus=os.cpu_count() or 1)  # "local": never a stale `ray start`'s address file
            self._task_cpus = 1
            log.info("started a local Ray instance")

    def __call__(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        if len(items) < self.min_items and not self.force:
            return serial_map(fn, items)
        self._ensure_ray()
        import ray

        remote = ray.remote(num_cpus=self._task_cpus)(_threaded(fn))
        return ray.get([remote.remote(x) for x in items])


def _threaded(fn: Callable[[T], R]) -> Callable[[T], R]:
    """Workers run one torch/numpy thread each; oversubscribed cores slow everyone down."""

    def run(x: T) -> R:
        import torch

        torch.set_num_threads(1)
        return fn(x)

    run.__name__ = getattr(fn, "__name__", "task")
    return run
