"""Multilayer perceptrons of any depth, evaluated for a whole zoo in one matmul per layer."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import Tensor

from fedfuse.architectures.base import Architecture, PermutationGroup, PermutationSpec
from fedfuse.errors import ArchitectureError

ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh}


@dataclass(frozen=True)
class MLPSpec(Architecture):
    """``sizes = (in, h_1, ..., h_{L-1}, out)`` with one activation between layers; tensors
    ``fc{l}.weight`` ``(sizes[l+1], sizes[l])`` and ``fc{l}.bias`` in order, exactly like a
    stack of ``torch.nn.Linear``. Hidden layer ``l``'s units permute rows of ``fc{l}``, entries
    of its bias and columns of ``fc{l+1}`` together."""

    sizes: tuple[int, ...]
    activation: str = "relu"
    kind = "mlp"

    def __post_init__(self) -> None:
        sizes = tuple(int(s) for s in self.sizes)
        object.__setattr__(self, "sizes", sizes)
        if len(sizes) < 2 or any(s <= 0 for s in sizes):
            raise ArchitectureError(f"an MLP needs at least (in, out) positive sizes, got {self.sizes}")
        if self.activation not in ACTIVATIONS:
            raise ArchitectureError(f"unknown activation {self.activation!r}; choose one of {sorted(ACTIVATIONS)}")

    @property
    def readout_weight(self) -> str:
        return f"fc{len(self.sizes) - 2}.weight"

    @property
    def readout_bias(self) -> str:
        return f"fc{len(self.sizes) - 2}.bias"

    @cached_property
    def shapes(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        out: list[tuple[str, tuple[int, ...]]] = []
        for li, (fan_in, fan_out) in enumerate(zip(self.sizes[:-1], self.sizes[1:])):
            out += [(f"fc{li}.weight", (fan_out, fan_in)), (f"fc{li}.bias", (fan_out,))]
        return tuple(out)

    @cached_property
    def permutations(self) -> PermutationSpec:
        return PermutationSpec(tuple(
            PermutationGroup(f"hidden{li}", h, ((f"fc{li}.weight", 0), (f"fc{li}.bias", 0), (f"fc{li + 1}.weight", 1)))
            for li, h in enumerate(self.sizes[1:-1])))

    def features(self, flat: Tensor, x: Tensor) -> Tensor:
        params = self.unflatten(flat)
        act = ACTIVATIONS[self.activation]
        h = x
        for li in range(len(self.sizes) - 2):
            h = act(h @ params[f"fc{li}.weight"].transpose(-1, -2) + params[f"fc{li}.bias"].unsqueeze(-2))
        return h

    def init(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """As ``torch.nn.Linear`` draws them: uniform in ``+-1/sqrt(fan_in)``."""
        parts = []
        for fan_in, fan_out in zip(self.sizes[:-1], self.sizes[1:]):
            bound = fan_in**-0.5
            parts += [(torch.rand(n, fan_out * fan_in, generator=generator) * 2 - 1) * bound,
                      (torch.rand(n, fan_out, generator=generator) * 2 - 1) * bound]
        return torch.cat(parts, dim=1)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "sizes": list(self.sizes), "activation": self.activation}

    def __str__(self) -> str:
        return f"MLP {list(self.sizes)}/{self.activation}"
