"""A second user family, unlike the bump: each device fits a noisy smooth step
``y = a tanh((x - c) / s) + b`` with a ReLU net.

It exists to check the squared-error device's acceptance rule on a family that differs from both
the sine benchmark (where the rule is chosen) and the bump (where it was first validated):
monotone targets, ReLU features, a four-number descriptor and label noise on the devices' own
examples, which the new devices' shots carry too (``benchmarks/rule_transfer.py --family
bump_family.steps:StepFamily``). Devices are scored against the noiseless step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bump_family import CurveFamily
from fedfuse.architectures import MLPSpec
from fedfuse.tasks import DescriptorSpec

X_RANGE = (-5.0, 5.0)
NOISE = 0.05


def step(tau: Tensor, x: Tensor) -> Tensor:
    """``(q, N, 1)`` values of the steps ``tau = (size, centre, width, offset)`` ``(q, 4)`` at ``x``."""
    a, c, s, b = (tau[:, i, None, None] for i in range(4))
    return a * torch.tanh((x - c) / s) + b


class StepFamily(CurveFamily):
    """Steps of size 0.5-2, centre -3..3, width 0.2-1.5, offset -1..1; a [1-40-40-1] ReLU net
    per device, 100 noisy examples each."""

    name = "step"
    arch = MLPSpec((1, 40, 40, 1), activation="relu")
    descriptor = DescriptorSpec(("size", "centre", "width", "offset"), (0.5, -3.0, 0.2, -1.0), (2.0, 3.0, 1.5, 1.0))

    def function(self, tau: Tensor, x: Tensor) -> Tensor:
        return step(tau, x)

    def _examples(self, tau: Tensor, n: int, seed: int) -> tuple[Tensor, Tensor]:
        gen = torch.Generator().manual_seed(seed)
        lo, hi = X_RANGE
        x = lo + (hi - lo) * torch.rand(n, 1, generator=gen)
        return x, step(tau, x)[0] + NOISE * torch.randn(n, 1, generator=gen)

    def probe(self, seed: int = 0) -> Tensor:
        return torch.linspace(*X_RANGE, 64)[:, None]
