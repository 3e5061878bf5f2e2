"""Fit a network's readout (its last linear layer) to a target function on the probe inputs.

With the hidden layers fixed, the outputs are linear in the readout, so the readout that best
reproduces a target function on the probe (ridge towards the current readout) is one batched
solve, and the map from target to readout is linear: a Gaussian over functions on the probe
becomes a Gaussian over readouts.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedfuse.architectures import Architecture


def design(spec: Architecture, weights: Tensor, x: Tensor) -> Tensor:
    """``(q, N, h + 1)``: each network's features at inputs ``x`` and a constant for the bias
    (``(q, N, d)`` for a bare vector, which has no bias)."""
    h = spec.features(weights, x).double()
    if spec.is_vector:
        return h
    return torch.cat([h, torch.ones(*h.shape[:-1], 1, dtype=h.dtype)], dim=-1)


def readout_map(spec: Architecture, weights: Tensor, probe: Tensor, ridge: float = 1e-3
                ) -> tuple[Tensor, Tensor]:
    """``(A, B)`` with ``readout = A @ target + B @ current`` the ridge solution, per network:
    ``A`` ``(q, h + 1, N)``, ``B`` ``(q, h + 1, h + 1)``. The ridge is relative to the features'
    mean energy, so it means the same whatever their scale."""
    phi = design(spec, weights, probe)
    gram = phi.transpose(-1, -2) @ phi
    p = gram.shape[-1]
    lam = ridge * torch.diagonal(gram, dim1=-2, dim2=-1).mean(-1)[:, None, None]
    reg = gram + lam * torch.eye(p, dtype=gram.dtype)
    a = torch.linalg.solve(reg, phi.transpose(-1, -2))
    b = torch.linalg.solve(reg, lam * torch.eye(p, dtype=gram.dtype).expand_as(reg))
    return a, b


def get_readout(spec: Architecture, weights: Tensor) -> Tensor:
    """``(q, h + 1, out)`` readout blocks of flat weights ``(q, d)``."""
    return weights[:, spec.readout_index]


def set_readout(spec: Architecture, weights: Tensor, readout: Tensor) -> Tensor:
    """A copy of ``weights`` with the readout blocks replaced."""
    out = weights.clone()
    out[:, spec.readout_index.flatten()] = readout.reshape(readout.shape[0], -1).to(out.dtype)
    return out
