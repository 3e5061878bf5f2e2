"""Mean-field Gaussian variational factors ``q = N(loc, diag scale^2)`` (reparameterized)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributions import Normal


class DiagonalGaussian(nn.Module):
    """A learnable ``N(loc, diag scale^2)`` of any shape; used for every task's code ``q(w_i)``
    (shape ``(n, e)``) and for the base component ``q(w_0)`` (shape ``(e_0,)``)."""

    def __init__(self, *shape: int, init_scale: float = 0.1) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(*shape))
        self.raw_scale = nn.Parameter(torch.full(shape, float(torch.log(torch.expm1(torch.tensor(init_scale))))))

    @property
    def scale(self) -> Tensor:
        return nn.functional.softplus(self.raw_scale) + 1e-6

    @property
    def mean(self) -> Tensor:
        return self.loc

    @property
    def variance(self) -> Tensor:
        return self.scale**2

    def distribution(self) -> Normal:
        return Normal(self.loc, self.scale)

    def entropy(self) -> Tensor:
        return self.distribution().entropy().sum()

    def kl_to(self, prior: Normal) -> Tensor:
        return torch.distributions.kl_divergence(self.distribution(), prior).sum()
