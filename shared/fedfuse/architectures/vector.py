"""A bare vector model (an embedding): no hidden units, nothing to align."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fedfuse.architectures.base import Architecture, PermutationSpec
from fedfuse.errors import ArchitectureError


@dataclass(frozen=True)
class VectorSpec(Architecture):
    """``length`` numbers ``u``; as a function, ``x @ u`` for inputs of the same length (a user
    embedding rating items by their public features). The whole vector is the readout."""

    length: int
    kind = "vector"
    readout_weight = "u"
    readout_bias = None

    def __post_init__(self) -> None:
        if int(self.length) <= 0:
            raise ArchitectureError(f"a vector needs a positive length, got {self.length}")
        object.__setattr__(self, "length", int(self.length))

    @property
    def shapes(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        return (("u", (1, self.length)),)

    @property
    def permutations(self) -> PermutationSpec:
        return PermutationSpec()

    @property
    def is_vector(self) -> bool:
        return True

    def features(self, flat: Tensor, x: Tensor) -> Tensor:
        return x.expand(*flat.shape[:-1], *x.shape[-2:])

    def init(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return 0.1 * torch.randn(n, self.length, generator=generator)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "length": self.length}

    def __str__(self) -> str:
        return f"vector of {self.length}"
