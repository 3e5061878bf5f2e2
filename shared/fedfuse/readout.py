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


def solve_readout(spec: Architecture, weights: Tensor, probe: Tensor, target: Tensor, ridge: float = 1e-3
                  ) -> tuple[Tensor, Tensor]:
    """The readout ``(q, h + 1, out)`` whose outputs on ``probe`` best reproduce ``target``
    ``(q, N, out)``, by ridge towards each network's current readout, and the linear map ``A``
    ``(q, h + 1, N)`` that carries a change of target to the readout. The ridge is relative to
    the features' mean energy, so it means the same whatever their scale."""
    phi = design(spec, weights, probe)
    gram = phi.transpose(-1, -2) @ phi
    lam = ridge * torch.diagonal(gram, dim1=-2, dim2=-1).mean(-1)[:, None, None]
    # the inverse from one Cholesky factor, then products: a served request's largest linear
    # algebra, where two LU solves (or triangular solves with many right-hand sides) cost more
    inv = torch.cholesky_inverse(torch.linalg.cholesky(gram + lam * torch.eye(gram.shape[-1], dtype=gram.dtype)))
    a = inv @ phi.transpose(-1, -2)
    return a @ target.double() + lam * (inv @ get_readout(spec, weights).double()), a


def held_out_outputs(spec: Architecture, weights: Tensor, probe: Tensor, target: Tensor, ridge: float) -> Tensor:
    """``(q, N, out)``: each network's output at each probe input when its readout is solved (as
    :func:`solve_readout` solves it) on every *other* probe input: the ridge regression's
    closed-form leave-one-out, ``target - residual / (1 - leverage)``."""
    readout, a = solve_readout(spec, weights, probe, target, ridge)
    phi = design(spec, weights, probe)
    leverage = (phi * a.transpose(-1, -2)).sum(-1, keepdim=True)  # the hat matrix's diagonal
    return target - (target - phi @ readout) / (1 - leverage)


def get_readout(spec: Architecture, weights: Tensor) -> Tensor:
    """``(q, h + 1, out)`` readout blocks of flat weights ``(q, d)``."""
    return weights[:, spec.readout_index]


def set_readout(spec: Architecture, weights: Tensor, readout: Tensor) -> Tensor:
    """A copy of ``weights`` with the readout blocks replaced."""
    out = weights.clone()
    out[:, spec.readout_index.flatten()] = readout.reshape(readout.shape[0], -1).to(out.dtype)
    return out
