"""Architectures a zoo can hold: MLPs of any depth, bare vectors, any torch module whose
symmetries are declared (a small CNN ships), all as flat weight vectors."""

from __future__ import annotations

from typing import Any

from fedfuse.architectures.base import Architecture, PermutationGroup, PermutationSpec
from fedfuse.architectures.mlp import MLPSpec
from fedfuse.architectures.module import ModuleSpec, SmallCNN, register_module
from fedfuse.architectures.vector import VectorSpec
from fedfuse.errors import ArchitectureError


def from_dict(data: Any) -> Architecture:
    """Rebuild an architecture from :meth:`Architecture.to_dict`; anything else is refused."""
    try:
        kind = data["kind"]
        if kind == "mlp":
            return MLPSpec(tuple(int(s) for s in data["sizes"]), str(data.get("activation", "relu")))
        if kind == "vector":
            return VectorSpec(int(data["length"]))
        if kind == "module":
            config = data.get("config", {})
            if not isinstance(config, dict):
                raise TypeError("config must be a mapping")
            return ModuleSpec(str(data["name"]), dict(config))
    except (KeyError, TypeError, ValueError) as exc:
        raise ArchitectureError(f"malformed architecture {str(data)[:200]!r}: {exc}") from exc
    raise ArchitectureError(f"unknown architecture kind {str(kind)[:40]!r}; use 'mlp', 'vector' or 'module'")


__all__ = ["Architecture", "MLPSpec", "ModuleSpec", "PermutationGroup", "PermutationSpec", "SmallCNN",
           "VectorSpec", "from_dict", "register_module"]
