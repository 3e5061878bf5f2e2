"""Flat weight layout of a multilayer perceptron and its hidden-unit symmetry.

A model zoo is a matrix of flat weight vectors, one row per model. Everything the fusion needs
to know about the architecture lives here: how the flat vector splits into ``(W_l, b_l)``, which
flat entries belong to hidden unit ``u`` of layer ``l``, and how a permutation of hidden units
(the symmetry that leaves the network's function unchanged) acts on the flat vector.

Flat order: ``W_1, b_1, W_2, b_2, ...`` with ``W_l`` of shape ``(sizes[l], sizes[l-1])`` in
row-major order, exactly like ``torch.nn.Linear``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import torch
from torch import Tensor

from fedfuse.errors import ArchitectureError

ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh}


@dataclass(frozen=True)
class MLPSpec:
    """Architecture ``sizes = (in, h_1, ..., h_{L-1}, out)`` with one activation between layers.

    An MLP with no hidden layer (``sizes == (in, out)``) has no hidden-unit symmetry; an
    embedding vector is ``MLPSpec((d,), activation="none")``: a bare vector of ``d`` weights.
    """

    sizes: tuple[int, ...]
    activation: str = "relu"

    def __post_init__(self) -> None:
        sizes = tuple(int(s) for s in self.sizes)
        object.__setattr__(self, "sizes", sizes)
        if not sizes or any(s <= 0 for s in sizes):
            raise ArchitectureError(f"layer sizes must be positive integers, got {self.sizes}")
        if self.activation not in (*ACTIVATIONS, "none"):
            raise ArchitectureError(
                f"unknown activation {self.activation!r}; choose one of {sorted(ACTIVATIONS)}"
            )
        if len(sizes) == 1 and self.activation != "none":
            raise ArchitectureError("a single size describes a bare vector: use activation='none'")

    # -- shapes ---------------------------------------------------------------------------------
    @property
    def is_vector(self) -> bool:
        return len(self.sizes) == 1

    @cached_property
    def shapes(self) -> list[tuple[int, ...]]:
        """Shapes of the tensors in flat order."""
        if self.is_vector:
            return [(self.sizes[0],)]
        out: list[tuple[int, ...]] = []
        for fan_in, fan_out in zip(self.sizes[:-1], self.sizes[1:]):
            out += [(fan_out, fan_in), (fan_out,)]
        return out

    @cached_property
    def offsets(self) -> list[int]:
        offs, total = [], 0
        for shape in self.shapes:
            offs.append(total)
            total += _numel(shape)
        return offs

    @property
    def num_weights(self) -> int:
        return self.offsets[-1] + _numel(self.shapes[-1])

    @property
    def num_outputs(self) -> int:
        return 1 if self.is_vector else self.sizes[-1]

    @property
    def hidden_sizes(self) -> tuple[int, ...]:
        return () if self.is_vector else self.sizes[1:-1]

    @property
    def num_hidden_layers(self) -> int:
        return len(self.hidden_sizes)

    # -- flatten / unflatten ----------------------------------------------------------------------
    def unflatten(self, flat: Tensor) -> list[Tensor]:
        """Split ``flat`` of shape ``(..., d)`` into views shaped like the layer tensors."""
        self.check_flat(flat)
        lead = flat.shape[:-1]
        return [
            flat[..., off : off + _numel(shape)].reshape(*lead, *shape)
            for off, shape in zip(self.offsets, self.shapes)
        ]

    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        """Inverse of :meth:`unflatten` (accepts a leading batch shape)."""
        if len(tensors) != len(self.shapes):
            raise ArchitectureError(f"expected {len(self.shapes)} tensors, got {len(tensors)}")
        parts = []
        for t, shape in zip(tensors, self.shapes):
            if tuple(t.shape[t.dim() - len(shape) :]) != shape:
                raise ArchitectureError(f"tensor of shape {tuple(t.shape)} where {shape} belongs")
            parts.append(t.reshape(*t.shape[: t.dim() - len(shape)], -1))
        return torch.cat(parts, dim=-1)

    def check_flat(self, flat: Tensor) -> None:
        if flat.shape[-1] != self.num_weights:
            raise ArchitectureError(
                f"weight vector has {flat.shape[-1]} entries; architecture {list(self.sizes)} "
                f"has {self.num_weights}"
            )

    # -- the function ------------------------------------------------------------------------------
    def forward(self, flat: Tensor, x: Tensor) -> Tensor:
        """Evaluate the network(s) ``flat`` of shape ``(d,)`` or ``(n, d)`` on inputs ``x``.

        ``x`` is ``(N, in)`` (shared by all nets) or ``(n, N, in)`` (one input set per net).
        Batched evaluation lets a whole zoo train or predict in one matmul per layer. A bare
        vector ``u`` computes ``x @ u`` (a user embedding rating items by their features).
        """
        if self.is_vector:  # a linear function of inputs of its own length (e.g. item features)
            return x @ flat.unsqueeze(-1)
        params = self.unflatten(flat)
        act = ACTIVATIONS[self.activation]
        h = x
        n_layers = len(params) // 2
        for li in range(n_layers):
            w, b = params[2 * li], params[2 * li + 1]
            h = h @ w.transpose(-1, -2) + b.unsqueeze(-2)
            if li < n_layers - 1:
                h = act(h)
        return h

    def features(self, flat: Tensor, x: Tensor) -> Tensor:
        """What the readout (the last linear layer) sees: the last hidden layer's activations
        ``(n, N, h)`` (the inputs themselves when there is no hidden layer or for a vector)."""
        if self.is_vector:
            return x.expand(*flat.shape[:-1], *x.shape[-2:])
        params = self.unflatten(flat)
        act = ACTIVATIONS[self.activation]
        h = x
        for li in range(len(params) // 2 - 1):
            h = act(h @ params[2 * li].transpose(-1, -2) + params[2 * li + 1].unsqueeze(-2))
        return h

    @cached_property
    def readout_index(self) -> Tensor:
        """Flat indices of the readout as a ``(h + 1, out)`` block: row ``j < h`` holds the
        weights from feature ``j`` to every output, the last row the biases. A bare vector is
        all readout: ``(d, 1)``."""
        if self.is_vector:
            return torch.arange(self.num_weights)[:, None]
        out, fan_in = self.shapes[-2]
        w = self.offsets[-2] + torch.arange(out * fan_in).view(out, fan_in).T
        b = self.offsets[-1] + torch.arange(out)[None, :]
        return torch.cat([w, b])

    def init(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` independent random initializations, as ``torch.nn.Linear`` draws them."""
        if self.is_vector:
            return torch.randn(n, self.num_weights, generator=generator) * 0.1
        parts = []
        for shape in self.shapes:
            fan_in = shape[1] if len(shape) == 2 else parts[-1].shape[-1]
            bound = 1.0 / fan_in**0.5
            parts.append((torch.rand(n, *shape, generator=generator) * 2 - 1) * bound)
        return self.flatten(parts)

    # -- hidden-unit symmetry ----------------------------------------------------------------------
    def unit_index(self, layer: int) -> Tensor:
        """Flat indices of each unit of hidden layer ``layer`` (0-based), shape ``(H, k)``.

        Unit ``u`` owns row ``u`` of ``W_l``, entry ``u`` of ``b_l`` and column ``u`` of
        ``W_{l+1}``: exactly the weights a permutation of that layer moves together.
        """
        if not 0 <= layer < self.num_hidden_layers:
            raise ArchitectureError(f"no hidden layer {layer} in {list(self.sizes)}")
        h, fan_in, fan_out = self.sizes[layer + 1], self.sizes[layer], self.sizes[layer + 2]
        w_in, b_in, w_out = (self.offsets[2 * layer + j] for j in range(3))
        u = torch.arange(h)
        rows = w_in + u[:, None] * fan_in + torch.arange(fan_in)[None, :]
        bias = (b_in + u)[:, None]
        cols = w_out + torch.arange(fan_out)[None, :] * h + u[:, None]
        return torch.cat([rows, bias, cols], dim=1)

    def identity_perms(self) -> list[Tensor]:
        return [torch.arange(h) for h in self.hidden_sizes]

    def gather_index(self, perms: Sequence[Tensor]) -> Tensor:
        """Flat index ``g`` such that ``flat[g]`` is the model with its units re-ordered.

        ``perms[l][v]`` is the model's unit that takes canonical position ``v`` in hidden layer
        ``l``; rows of ``W_l``/``b_l`` and columns of ``W_{l+1}`` move together, so the
        re-ordered network computes the same function.
        """
        if len(perms) != self.num_hidden_layers:
            raise ArchitectureError(
                f"{len(perms)} permutations given for {self.num_hidden_layers} hidden layers"
            )
        idx = torch.arange(self.num_weights)
        if self.is_vector:
            return idx
        pieces = []
        n_layers = len(self.sizes) - 1
        for li in range(n_layers):
            fan_out, fan_in = self.shapes[2 * li]
            row_p = perms[li] if li < n_layers - 1 else torch.arange(fan_out)
            col_p = perms[li - 1] if li > 0 else torch.arange(fan_in)
            w = idx[self.offsets[2 * li] : self.offsets[2 * li] + fan_out * fan_in]
            pieces.append(w.view(fan_out, fan_in)[row_p][:, col_p].reshape(-1))
            pieces.append(idx[self.offsets[2 * li + 1] : self.offsets[2 * li + 1] + fan_out][row_p])
        return torch.cat(pieces)

    def permute(self, flat: Tensor, perms: Sequence[Tensor]) -> Tensor:
        return flat[..., self.gather_index(perms)]

    # -- wire format --------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"sizes": list(self.sizes), "activation": self.activation}

    @classmethod
    def from_dict(cls, data: dict) -> "MLPSpec":
        try:
            return cls(tuple(data["sizes"]), str(data.get("activation", "relu")))
        except (KeyError, TypeError, ValueError) as exc:
            raise ArchitectureError(f"malformed architecture spec {data!r}: {exc}") from exc


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
