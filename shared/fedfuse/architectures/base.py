"""A network as a flat weight vector: named tensors, a batched forward, its symmetries, its readout.

A model zoo is a matrix of flat weight vectors, one row per model. Everything the fusion needs
to know about an architecture is here: how the flat vector splits into named tensors, which
axes of which tensors one hidden-unit permutation moves together (a
:class:`PermutationSpec`, as in Git Re-Basin: permuting them leaves the function unchanged),
and which tensors form the readout (the last linear map, from features to outputs).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar, Sequence

import torch
from torch import Tensor

from fedfuse.errors import ArchitectureError


@dataclass(frozen=True)
class PermutationGroup:
    """One hidden-unit symmetry: ``size`` units, and every ``(tensor, axis)`` it permutes."""

    name: str
    size: int
    axes: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class PermutationSpec:
    """Which axes of which named tensors share a permutation (Git Re-Basin's ``PermutationSpec``).
    Each tensor axis belongs to at most one group."""

    groups: tuple[PermutationGroup, ...] = ()

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(g.size for g in self.groups)

    def check(self, shapes: dict[str, tuple[int, ...]]) -> None:
        seen: set[tuple[str, int]] = set()
        for g in self.groups:
            for name, axis in g.axes:
                if name not in shapes or not 0 <= axis < len(shapes[name]):
                    raise ArchitectureError(f"permutation {g.name!r} names axis {axis} of {name!r}, "
                                            "which the architecture does not have")
                if shapes[name][axis] != g.size:
                    raise ArchitectureError(f"permutation {g.name!r} has {g.size} units but axis {axis} "
                                            f"of {name!r} has {shapes[name][axis]}")
                if (name, axis) in seen:
                    raise ArchitectureError(f"axis {axis} of {name!r} belongs to two permutations")
                seen.add((name, axis))


class Architecture(ABC):
    """Flat layout, batched forward, symmetries and readout of one kind of network.

    Subclasses give the named ``shapes``, the ``permutations``, the readout tensor names,
    ``features`` (what the readout sees), ``init`` and ``to_dict``; everything else is here.
    Weights are flat ``(..., d)`` tensors in the order of ``shapes``.
    """

    kind: ClassVar[str]
    readout_weight: str  # (outputs, features)
    readout_bias: str | None  # (outputs,), or None

    # -- what a subclass defines ------------------------------------------------------------------
    @property
    @abstractmethod
    def shapes(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """Named tensor shapes in flat order."""

    @property
    @abstractmethod
    def permutations(self) -> PermutationSpec:
        """The hidden-unit symmetries (none for a model without hidden units)."""

    @abstractmethod
    def features(self, flat: Tensor, x: Tensor) -> Tensor:
        """What the readout sees: ``(n, N, h)`` for weights ``(n, d)`` and inputs ``x``."""

    @abstractmethod
    def init(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` independent random initializations ``(n, d)``."""

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """A JSON description that :func:`fedfuse.architectures.from_dict` rebuilds this from."""

    # -- layout -------------------------------------------------------------------------------------
    @cached_property
    def offsets(self) -> dict[str, int]:
        out, total = {}, 0
        for name, shape in self.shapes:
            out[name] = total
            total += _numel(shape)
        return out

    @cached_property
    def num_weights(self) -> int:
        return sum(_numel(shape) for _, shape in self.shapes)

    @property
    def is_vector(self) -> bool:
        return False

    @property
    def num_outputs(self) -> int:
        return dict(self.shapes)[self.readout_weight][0]

    @property
    def perm_sizes(self) -> tuple[int, ...]:
        return self.permutations.sizes

    def check_flat(self, flat: Tensor) -> None:
        if flat.shape[-1] != self.num_weights:
            raise ArchitectureError(f"weight vector has {flat.shape[-1]} entries; architecture {self} "
                                    f"has {self.num_weights}")

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Views of ``flat`` ``(..., d)`` shaped like the named tensors."""
        self.check_flat(flat)
        lead = flat.shape[:-1]
        return {name: flat[..., self.offsets[name] : self.offsets[name] + _numel(shape)].reshape(*lead, *shape)
                for name, shape in self.shapes}

    def flatten(self, tensors: dict[str, Tensor] | Sequence[Tensor]) -> Tensor:
        """Inverse of :meth:`unflatten` (accepts a leading batch shape, or tensors in order)."""
        items = list(tensors.values()) if isinstance(tensors, dict) else list(tensors)
        if len(items) != len(self.shapes):
            raise ArchitectureError(f"expected {len(self.shapes)} tensors, got {len(items)}")
        parts = []
        for t, (name, shape) in zip(items, self.shapes):
            if tuple(t.shape[t.dim() - len(shape):]) != shape:
                raise ArchitectureError(f"tensor of shape {tuple(t.shape)} where {name} {shape} belongs")
            parts.append(t.reshape(*t.shape[: t.dim() - len(shape)], -1))
        return torch.cat(parts, dim=-1)

    # -- the function -------------------------------------------------------------------------------
    def forward(self, flat: Tensor, x: Tensor) -> Tensor:
        """Outputs ``(n, N, out)`` of the networks ``flat`` ``(n, d)`` (or ``(N, out)`` for one
        ``(d,)``) on inputs ``x``: the readout applied to the features."""
        params = self.unflatten(flat)
        out = self.features(flat, x) @ params[self.readout_weight].transpose(-1, -2)
        if self.readout_bias is not None:
            out = out + params[self.readout_bias].unsqueeze(-2)
        return out

    @cached_property
    def readout_index(self) -> Tensor:
        """Flat indices of the readout as a ``(h [+ 1], out)`` block: row ``j`` holds the weights
        from feature ``j`` to every output, the last row the biases when there are any."""
        out, h = dict(self.shapes)[self.readout_weight]
        w = self.offsets[self.readout_weight] + torch.arange(out * h).view(out, h).T
        if self.readout_bias is None:
            return w
        return torch.cat([w, self.offsets[self.readout_bias] + torch.arange(out)[None, :]])

    # -- symmetries ---------------------------------------------------------------------------------
    @cached_property
    def _index(self) -> dict[str, Tensor]:
        return {name: self.offsets[name] + torch.arange(_numel(shape)).view(shape) for name, shape in self.shapes}

    def unit_index(self, group: int) -> Tensor:
        """Flat indices of each unit of permutation ``group``, ``(size, k)``: every weight the
        group's permutation moves together with that unit."""
        g = self._group(group)
        parts = [self._index[name].movedim(axis, 0).reshape(g.size, -1) for name, axis in g.axes]
        return torch.cat(parts, dim=1)

    def gather_index(self, perms: Sequence[Tensor]) -> Tensor:
        """Flat index ``i`` such that ``flat[i]`` is the model with its units re-ordered:
        ``perms[g][v]`` is the model's unit that takes canonical position ``v`` in group ``g``."""
        return self.batched_gather_index([p[None] for p in self._check_perms(perms)])[0]

    def batched_gather_index(self, perms: Sequence[Tensor]) -> Tensor:
        """:meth:`gather_index` for ``n`` models at once: ``perms[g]`` ``(n, size)`` -> ``(n, d)``."""
        perms = self._check_perms(perms)
        n = perms[0].shape[0] if perms else 1
        by_tensor: dict[str, list[tuple[int, Tensor]]] = {}
        for g, p in zip(self.permutations.groups, perms):
            for name, axis in g.axes:
                by_tensor.setdefault(name, []).append((axis, p))
        parts = []
        for name, shape in self.shapes:
            idx = self._index[name].expand(n, *shape)
            for axis, p in by_tensor.get(name, []):
                view = [n] + [1] * len(shape)
                view[axis + 1] = shape[axis]
                idx = idx.gather(axis + 1, p.reshape(view).expand(n, *shape))
            parts.append(idx.reshape(n, -1))
        return torch.cat(parts, dim=1)

    def permute(self, flat: Tensor, perms: Sequence[Tensor]) -> Tensor:
        return flat[..., self.gather_index(perms)]

    def _group(self, group: int) -> PermutationGroup:
        groups = self.permutations.groups
        if not 0 <= group < len(groups):
            raise ArchitectureError(f"no permutation group {group} in {self} ({len(groups)} groups)")
        return groups[group]

    def _check_perms(self, perms: Sequence[Tensor]) -> list[Tensor]:
        if len(perms) != len(self.perm_sizes):
            raise ArchitectureError(f"{len(perms)} permutations given for {len(self.perm_sizes)} "
                                    f"permutation groups of {self}")
        return [torch.as_tensor(p).long() for p in perms]

    def __str__(self) -> str:
        return f"{self.kind}{self.to_dict()}"


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
