"""The task-family protocol: everything fedfuse needs to know about one kind of task.

A family names its architecture, its descriptor (length, names, valid domain), how a simulated
device gets its private data, how a device trains its own model, which inputs the server may
probe models with (public, never client data), how a model is scored, and the meta-model
settings that suit it. The server and the device apps use nothing else, so a user's own task is
a family object, found by ``family = "package.module:object"`` in the run config.
"""

from __future__ import annotations

import importlib
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from fedfuse.architectures import Architecture
from fedfuse.errors import DescriptorError, FedfuseError
from fedfuse.training import train_networks
from fedfuse.io import load_tensors, save_tensors

DATA_FORMAT = "fedfuse.client_data/2"


@dataclass(frozen=True)
class Score:
    """How a model is judged on a device's held-back examples."""

    name: str
    higher_is_better: bool
    digits: int = 3


@dataclass(frozen=True)
class DescriptorSpec:
    """A task descriptor: its entries' names and the domain each must lie in (inclusive)."""

    names: tuple[str, ...]
    low: tuple[float, ...]
    high: tuple[float, ...]

    def __post_init__(self) -> None:
        if not (len(self.names) == len(self.low) == len(self.high)) or not self.names:
            raise FedfuseError("a descriptor needs one name, low and high per entry")

    @property
    def length(self) -> int:
        return len(self.names)

    def uniform(self, n: int, gen: torch.Generator) -> Tensor:
        """``(n, length)`` descriptors drawn uniformly from the domain: simulated tasks."""
        lo, hi = torch.tensor(self.low), torch.tensor(self.high)
        return lo + (hi - lo) * torch.rand(n, self.length, generator=gen)

    def check(self, tau: list[float]) -> None:
        """Refuse a descriptor of the wrong length or outside the family's domain."""
        if len(tau) != self.length:
            raise DescriptorError(f"descriptor has length {len(tau)}; this family's has {self.length} "
                                  f"({', '.join(self.names)})")
        bad = [f"{n}={t:.4g} not in [{lo:g}, {hi:g}]"
               for n, t, lo, hi in zip(self.names, tau, self.low, self.high) if not lo <= t <= hi]
        if bad:
            raise DescriptorError(f"descriptor outside the family's domain: {'; '.join(bad[:3])}")


@dataclass
class DeviceConfig:
    """What the run config tells a simulated device: the fleet and the seed."""

    num_clients: int
    num_new: int
    seed: int
    shots: int


@dataclass
class LocalData:
    """A device's private data: its training examples (a zoo device) or its few shots (a new
    device), and examples it holds back to judge models on. It never leaves the device. Targets
    are shaped as the model's outputs ``(k, out)``, or class indices ``(k,)`` for cross-entropy."""

    client_id: str
    role: str  # "zoo": trains a model and uploads it; "new": wants a personalized one
    tau: list[float]
    x: Tensor
    y: Tensor
    x_eval: Tensor
    y_eval: Tensor

    def save(self, path: str | os.PathLike, family: str) -> None:
        save_tensors(path, {"x": self.x, "y": self.y, "x_eval": self.x_eval, "y_eval": self.y_eval},
                     {"format": DATA_FORMAT, "family": family, "client_id": self.client_id,
                      "role": self.role, "tau": self.tau})

    @classmethod
    def load(cls, path: str | os.PathLike, family: str, client_id: str | None = None) -> "LocalData":
        tensors, meta = load_tensors(path)
        if meta.get("format") != DATA_FORMAT:
            raise FedfuseError(f"{path} is not a fedfuse device data file ({DATA_FORMAT})")
        if meta.get("family") != family:
            raise FedfuseError(f"{path} holds {meta.get('family')!r} data; this run's family is {family!r}")
        return cls(client_id or meta["client_id"], meta["role"], list(meta["tau"]), tensors["x"], tensors["y"],
                   tensors["x_eval"], tensors["y_eval"])


@dataclass(frozen=True)
class Recipe:
    """A device's local Adam: its own model from its own init (``train``) and the cold-start
    baseline a new device compares against (``finetune``)."""

    train_steps: int
    train_lr: float
    finetune_steps: int
    finetune_lr: float
    batch_size: int | None = None


class TaskFamily(ABC):
    """One kind of task. Subclasses set the attributes and implement :meth:`simulated_device`
    and :meth:`evaluate`; training, probing and settings have defaults."""

    name: str
    arch: Architecture
    descriptor: DescriptorSpec
    loss: str  # "mse" or "ce": the device's training loss and its likelihood for shots
    score: Score
    recipe: Recipe
    meta_settings: dict[str, Any] = {}  # recommended MetaModel settings (never mutated)

    @abstractmethod
    def simulated_device(self, index: int, cfg: DeviceConfig) -> LocalData:
        """Device ``index`` of a simulated fleet: the first ``num_clients`` are zoo devices."""

    @abstractmethod
    def evaluate(self, weights: Tensor, data: LocalData) -> Tensor:
        """Score ``(q,)`` of networks ``(q, d)`` on the device's held-back examples."""

    def probe(self, seed: int = 0) -> Tensor | None:
        """Inputs the server generates itself (public; never client data), or ``None``."""
        return None

    @property
    def likelihood(self) -> str:
        return "softmax" if self.loss == "ce" else "gaussian"

    def train(self, data: LocalData, seed: int, steps: int | None = None) -> Tensor:
        """What a zoo device does: its own random init, trained on its own examples."""
        init = self.arch.init(1, torch.Generator().manual_seed(seed))
        r = self.recipe
        return train_networks(self.arch, init, data.x[None], data.y[None], steps or r.train_steps, r.train_lr,
                        loss=self.loss, batch_size=r.batch_size, seed=seed)[0]

    def meta_model_settings(self) -> dict[str, Any]:
        return {"likelihood": self.likelihood, **self.meta_settings}


_REGISTRY: dict[str, Callable[[], TaskFamily]] = {}


def register(name: str, factory: Callable[[], TaskFamily]) -> None:
    """Make ``family = name`` in a run config build ``factory()``."""
    _REGISTRY[name] = factory


def get_family(name: str) -> TaskFamily:
    """A registered family by name, or a user's own as ``"package.module:object"`` (an instance
    or a zero-argument factory)."""
    if name in _REGISTRY:
        return _REGISTRY[name]()
    if ":" not in name:
        raise FedfuseError(f"unknown task family {name!r}; registered: {sorted(_REGISTRY)}, or give your "
                           "own as 'package.module:object'")
    module_name, _, attr = name.partition(":")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise FedfuseError(f"cannot load task family {name!r}: {exc}") from exc
    family = obj() if callable(obj) and not isinstance(obj, TaskFamily) else obj
    if not isinstance(family, TaskFamily):
        raise FedfuseError(f"{name!r} is a {type(family).__name__}, not a fedfuse TaskFamily")
    return family


def registered() -> list[str]:
    return sorted(_REGISTRY)


__all__ = ["DeviceConfig", "DescriptorSpec", "LocalData", "Recipe", "Score", "TaskFamily", "get_family",
           "register", "registered"]
