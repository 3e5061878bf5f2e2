"""Kernels over task descriptors (gpytorch): how much a new task borrows from each zoo model.

Three families, chosen per zoo by leave-one-out (:mod:`fedfuse.function_space`):

* ``rbf``: an ARD RBF on robustly standardized descriptors (one lengthscale per entry);
* ``rbf+linear``: the same plus a linear kernel, for descriptors a model depends on linearly
  (an amplitude, a user's mean rating);
* ``overlap``: for set-valued descriptors (indicator or non-negative weight vectors, such as the
  digits a task names): ``exp(-(1 - cos(S, S')) / l^2)``, a function of the sets' overlap alone.
"""

from __future__ import annotations

import gpytorch
import torch
from torch import Tensor

KERNELS = ("rbf", "rbf+linear", "overlap")


class OverlapKernel(gpytorch.kernels.Kernel):
    """``k(S, S') = exp(-(1 - <S, S'> / (|S| |S'|)) / l^2)`` for non-negative descriptors.

    The cosine of two non-negative vectors is a normalized linear kernel, and the exponential of
    a positive semi-definite kernel is positive semi-definite, so this is a valid kernel for any
    lengthscale ``l``. Tasks that share more of their elements share more of their function.
    """

    has_lengthscale = True

    def forward(self, x1: Tensor, x2: Tensor, diag: bool = False, **params) -> Tensor:
        n1 = x1.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        n2 = x2.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        u1, u2 = x1 / n1, x2 / n2
        cos = (u1 * u2).sum(-1) if diag else u1 @ u2.transpose(-1, -2)
        ls = self.lengthscale.squeeze(-1) if diag else self.lengthscale
        return torch.exp(-(1.0 - cos) / ls**2)


def make_kernel(name: str, dim: int) -> gpytorch.kernels.Kernel:
    """A fresh kernel of family ``name`` over ``dim``-entry descriptors, in float64."""
    if name == "rbf":
        kernel = gpytorch.kernels.RBFKernel(ard_num_dims=dim)
    elif name == "rbf+linear":
        linear = gpytorch.kernels.LinearKernel()
        with torch.no_grad():
            linear.variance = torch.tensor(1.0 / dim)
        kernel = gpytorch.kernels.RBFKernel(ard_num_dims=dim) + linear
    elif name == "overlap":
        kernel = OverlapKernel()
    else:
        raise ValueError(f"unknown kernel {name!r}; choose one of {KERNELS}")
    return kernel.double()


def is_set_valued(tau: Tensor) -> bool:
    """Descriptors that can be read as (weighted) sets: non-negative, no empty row."""
    return bool((tau >= 0).all() and (tau.abs().sum(-1) > 0).all())


def scale_lengthscales(kernel: gpytorch.kernels.Kernel, factor: float) -> None:
    """Multiply every lengthscale of ``kernel`` (and of its parts) by ``factor``."""
    for module in kernel.modules():
        if getattr(module, "has_lengthscale", False):
            with torch.no_grad():
                module.lengthscale = module.lengthscale * factor
