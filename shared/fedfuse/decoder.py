"""The decoder ``(m_lambda, v_lambda)``: codes ``[w_0; w]`` to a Gaussian over canonical weights."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class WeightDecoder(nn.Module):
    """A shared MLP trunk with two heads: the mean of each canonical weight and its variance
    (softplus, floored so the likelihood cannot collapse onto one weight)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: tuple[int, ...] = (256, 256),
                 min_var: float = 1e-5) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.SiLU()]
            width = h
        self.trunk = nn.Sequential(*layers)
        self.mean_head = nn.Linear(width, out_dim)
        self.var_head = nn.Linear(width, out_dim)
        self.min_var = min_var

    @torch.no_grad()
    def init_output(self, mean: Tensor, var: Tensor) -> None:
        """Start at the zoo's (aligned) mean and variance so early steps learn structure, not
        offsets."""
        self.mean_head.weight.mul_(0.1)
        self.mean_head.bias.copy_(mean)
        self.var_head.weight.mul_(0.1)
        v = (var - self.min_var).clamp_min(1e-4)
        self.var_head.bias.copy_(v + torch.log(-torch.expm1(-v)))  # softplus^-1

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        h = self.trunk(z)
        return self.mean_head(h), nn.functional.softplus(self.var_head(h)) + self.min_var

    def mean(self, z: Tensor) -> Tensor:
        """The mean head alone: an initializer needs no variance head (as wide as the weights)."""
        return self.mean_head(self.trunk(z))
