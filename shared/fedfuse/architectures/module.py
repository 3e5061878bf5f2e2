"""Any torch module whose hidden-unit symmetries are declared, evaluated for a zoo with vmap.

A module for fedfuse computes the readout's *features* in ``forward`` and holds the readout as
an ``nn.Linear`` attribute ``readout``; its parameters, in ``named_parameters`` order, are the
flat weight vector. A builder returns the module and its :class:`PermutationSpec`; registered by
name (:func:`register_module`), an architecture travels as ``{"kind": "module", "name": ...,
"config": {...}}`` and both sides rebuild the same module from the same code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from fedfuse.architectures.base import Architecture, PermutationGroup, PermutationSpec
from fedfuse.errors import ArchitectureError

Builder = Callable[..., tuple[nn.Module, PermutationSpec]]
_BUILDERS: dict[str, Builder] = {}


def register_module(name: str, builder: Builder) -> None:
    """Make ``ModuleSpec(name, config)`` build ``builder(**config)``."""
    _BUILDERS[name] = builder


@dataclass(frozen=True)
class ModuleSpec(Architecture):
    """The architecture of ``builder(**config)`` for a registered builder ``name``."""

    name: str
    config: dict[str, Any] = field(default_factory=dict, hash=False)
    kind = "module"
    readout_weight = "readout.weight"
    readout_bias = "readout.bias"

    def __post_init__(self) -> None:
        if self.name not in _BUILDERS:
            raise ArchitectureError(f"no module architecture {self.name!r} is registered "
                                    f"(known: {sorted(_BUILDERS)})")
        self.permutations.check(dict(self.shapes))
        if not isinstance(getattr(self._module, "readout", None), nn.Linear):
            raise ArchitectureError(f"module {self.name!r} needs an nn.Linear attribute 'readout'")

    @cached_property
    def _built(self) -> tuple[nn.Module, PermutationSpec]:
        try:
            module, perms = _BUILDERS[self.name](**self.config)
        except TypeError as exc:
            raise ArchitectureError(f"module {self.name!r} cannot be built from {self.config}: {exc}") from exc
        return module.eval().requires_grad_(False), perms

    @property
    def _module(self) -> nn.Module:
        return self._built[0]

    @property
    def permutations(self) -> PermutationSpec:
        return self._built[1]

    @cached_property
    def shapes(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        return tuple((name, tuple(p.shape)) for name, p in self._module.named_parameters())

    def features(self, flat: Tensor, x: Tensor) -> Tensor:
        def one(w: Tensor, inputs: Tensor) -> Tensor:
            return functional_call(self._module, self.unflatten(w), (inputs,))

        if flat.dim() == 1:
            return one(flat, x)
        per_model = x.dim() > 2 and x.shape[0] == flat.shape[0]
        return vmap(one, in_dims=(0, 0 if per_model else None))(flat, x)

    def init(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Each model as the module's own initialization would draw it, from ``generator``."""
        seeds = torch.randint(0, 2**62, (n,), generator=generator).tolist()
        out = []
        for seed in seeds:
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                module, _ = _BUILDERS[self.name](**self.config)
            out.append(torch.nn.utils.parameters_to_vector(module.parameters()).detach())
        return torch.stack(out)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "config": dict(self.config)}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ModuleSpec) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash((self.name, repr(sorted(self.config.items()))))

    def __str__(self) -> str:
        return f"module {self.name} {self.config}"


class SmallCNN(nn.Module):
    """Two convolutions (ReLU, 2x2 max pooling), global average pooling, one hidden layer; the
    readout maps the hidden units to the classes. Inputs are flat images ``(N, side * side)``."""

    def __init__(self, channels: tuple[int, int] = (8, 16), hidden: int = 32, classes: int = 10,
                 side: int = 28, kernel: int = 5) -> None:
        super().__init__()
        self.side = side
        self.conv1 = nn.Conv2d(1, channels[0], kernel)
        self.conv2 = nn.Conv2d(channels[0], channels[1], kernel)
        self.fc = nn.Linear(channels[1], hidden)
        self.readout = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = x.reshape(-1, 1, self.side, self.side)
        h = nn.functional.max_pool2d(torch.relu(self.conv1(h)), 2)
        h = nn.functional.max_pool2d(torch.relu(self.conv2(h)), 2)
        h = h.mean(dim=(-1, -2))
        return torch.relu(self.fc(h)).reshape(*x.shape[:-1], -1)


def small_cnn(channels: list[int] | tuple[int, int] = (8, 16), hidden: int = 32, classes: int = 10,
              side: int = 28, kernel: int = 5) -> tuple[nn.Module, PermutationSpec]:
    """A :class:`SmallCNN` and its symmetries: the channels of each convolution and the hidden
    units (a channel moves its filter, its bias and the next layer's input slice with it)."""
    c1, c2 = channels
    module = SmallCNN((c1, c2), hidden, classes, side, kernel)
    perms = PermutationSpec((
        PermutationGroup("conv1", c1, (("conv1.weight", 0), ("conv1.bias", 0), ("conv2.weight", 1))),
        PermutationGroup("conv2", c2, (("conv2.weight", 0), ("conv2.bias", 0), ("fc.weight", 1))),
        PermutationGroup("hidden", hidden, (("fc.weight", 0), ("fc.bias", 0), ("readout.weight", 1))),
    ))
    return module, perms


register_module("small-cnn", small_cnn)
