"""The model zoo: independently trained weight vectors with their task descriptors."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import Tensor

from fedfuse.errors import ArchitectureError, DescriptorError, ZooError
from fedfuse.io import load_tensors, save_tensors
from fedfuse import architectures
from fedfuse.architectures import Architecture

FORMAT = "fedfuse.zoo/1"


@dataclass
class ModelZoo:
    """``n`` models of one architecture: flat ``weights`` ``(n, d)``, descriptors ``tau``
    ``(n, D)``, the clients' own ``ids`` and their numbers of training examples."""

    spec: Architecture
    weights: Tensor
    tau: Tensor
    ids: list[str]
    n_examples: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.weights = torch.as_tensor(self.weights, dtype=torch.float32)
        self.tau = torch.as_tensor(self.tau, dtype=torch.float32)
        if self.tau.dim() == 1:
            self.tau = self.tau[:, None]
        self.ids = [str(i) for i in self.ids]
        if not self.n_examples:
            self.n_examples = [0] * len(self.ids)
        self.validate()

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def tau_dim(self) -> int:
        return self.tau.shape[1]

    def validate(self) -> None:
        """Refuse a zoo the fit could not use, naming the first offending model."""
        n = len(self.ids)
        if n == 0:
            raise ZooError("the zoo is empty: at least one model is needed")
        if self.weights.dim() != 2 or self.weights.shape[0] != n:
            raise ZooError(f"weights must be (n={n}, d); got shape {tuple(self.weights.shape)}")
        if self.weights.shape[1] != self.spec.num_weights:
            raise ArchitectureError(
                f"weights have {self.weights.shape[1]} entries per model; architecture "
                f"{self.spec} has {self.spec.num_weights}"
            )
        if self.tau.dim() != 2 or self.tau.shape[0] != n:
            raise DescriptorError(f"tau must be (n={n}, D); got shape {tuple(self.tau.shape)}")
        if len(set(self.ids)) != n:
            dup = sorted({i for i in self.ids if self.ids.count(i) > 1})
            raise ZooError(f"duplicate client ids in the zoo: {dup[:5]}")
        if len(self.n_examples) != n:
            raise ZooError(f"{len(self.n_examples)} example counts for {n} models")
        bad = ~torch.isfinite(self.weights).all(dim=1)
        if bad.any():
            raise ZooError(f"non-finite (NaN or inf) weights in models {self._names(bad)}")
        bad = ~torch.isfinite(self.tau).all(dim=1)
        if bad.any():
            raise DescriptorError(f"non-finite task descriptors for models {self._names(bad)}")

    def _names(self, mask: Tensor) -> list[str]:
        return [self.ids[i] for i in mask.nonzero().flatten()[:5].tolist()]

    @classmethod
    def from_models(
        cls,
        spec: Architecture,
        models: Iterable[tuple[str, Tensor | Sequence[float], Sequence[float], int]],
    ) -> "ModelZoo":
        """Build from ``(client_id, flat_weights, tau, n_examples)`` records, checking each."""
        ids, ws, taus, counts = [], [], [], []
        tau_len = None
        for cid, w, tau, count in models:
            w = torch.as_tensor(w, dtype=torch.float32).flatten()
            if w.numel() != spec.num_weights:
                raise ArchitectureError(
                    f"model {cid!r} has {w.numel()} weights; architecture {spec} "
                    f"has {spec.num_weights}"
                )
            tau = torch.as_tensor(tau, dtype=torch.float32).flatten()
            if tau_len is None:
                tau_len = tau.numel()
            elif tau.numel() != tau_len:
                raise DescriptorError(
                    f"model {cid!r} has a descriptor of length {tau.numel()}; others have {tau_len}"
                )
            ids.append(cid), ws.append(w), taus.append(tau), counts.append(int(count))
        if not ids:
            raise ZooError("the zoo is empty: at least one model is needed")
        return cls(spec, torch.stack(ws), torch.stack(taus), ids, counts)

    def subset(self, index: Sequence[int] | Tensor) -> "ModelZoo":
        idx = torch.as_tensor(index, dtype=torch.long)
        return ModelZoo(
            self.spec,
            self.weights[idx],
            self.tau[idx],
            [self.ids[i] for i in idx.tolist()],
            [self.n_examples[i] for i in idx.tolist()],
        )

    # -- persistence --------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        save_tensors(
            path,
            {
                "weights": self.weights,
                "tau": self.tau,
                "n_examples": torch.tensor(self.n_examples, dtype=torch.int64),
            },
            {"format": FORMAT, "spec": self.spec.to_dict(), "ids": self.ids},
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ModelZoo":
        tensors, meta = load_tensors(path)
        if meta.get("format") != FORMAT:
            raise ZooError(f"{path} holds {meta.get('format')!r}, not a model zoo ({FORMAT})")
        return cls(
            architectures.from_dict(meta["spec"]),
            tensors["weights"],
            tensors["tau"],
            meta["ids"],
            tensors["n_examples"].tolist(),
        )


def check_descriptor(tau: Tensor | Sequence[float], dim: int) -> Tensor:
    """A finite descriptor of length ``dim`` as a float tensor ``(1, dim)``, or a clear error."""
    t = torch.as_tensor(tau, dtype=torch.float32)
    if t.dim() == 0:
        t = t[None]
    t = t.reshape(-1, t.shape[-1]) if t.dim() > 1 else t[None]
    if t.shape[-1] != dim:
        raise DescriptorError(f"task descriptor has length {t.shape[-1]}; this model expects {dim}")
    if not torch.isfinite(t).all():
        raise DescriptorError(f"task descriptor has non-finite entries: {t.tolist()}")
    return t


def robust_scale(tau: Tensor) -> tuple[Tensor, Tensor]:
    """Per-entry location (median) and scale (1.4826 MAD) of descriptors ``(n, D)``: one extreme
    descriptor cannot stretch everyone else's distances, as it would with mean and std. Where
    more than half the zoo shares a value (MAD 0, e.g. indicator bits) the std is used, and 1
    where every descriptor agrees."""
    t = tau.double()
    loc = t.median(0).values
    mad = 1.4826 * (t - loc).abs().median(0).values
    std = t.std(0, unbiased=False)
    scale = torch.where(mad > 1e-8, mad, torch.where(std > 1e-8, std, torch.ones_like(std)))
    return loc, scale


__all__ = ["ModelZoo", "check_descriptor", "robust_scale"]
