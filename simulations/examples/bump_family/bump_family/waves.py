"""A third user family, unlike the bump and the step: each device fits a noisy plane wave on a
square, ``y = a sin(k (x1 cos t + x2 sin t) + p)``, with a tanh net of two inputs.

It exists to validate the squared-error device's acceptance rule (``RULES``, chosen with it since
2026-12-07) on a family unlike the other two: two inputs (the probe a coarse 8 x 8 grid
of the square, the new devices scored on a finer 20 x 20 one that the probe does not contain), a
four-number descriptor, and label noise on the devices' examples and shots
(``benchmarks/rule_transfer.py --family bump_family.waves:WaveFamily``). Devices are scored
against the noiseless wave.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from bump_family import CurveFamily
from fedfuse.architectures import MLPSpec
from fedfuse.tasks import DescriptorSpec

HALF_WIDTH = 2.0  # the square [-2, 2]^2
NOISE = 0.1


def wave(tau: Tensor, x: Tensor) -> Tensor:
    """``(q, N, 1)`` values of the waves ``tau = (amplitude, direction, wavenumber, phase)``
    ``(q, 4)`` at ``x`` ``(N, 2)`` or ``(q, N, 2)``."""
    a, t, k, p = (tau[:, i, None] for i in range(4))
    along = x[..., 0] * torch.cos(t) + x[..., 1] * torch.sin(t)
    return (a * torch.sin(k * along + p))[..., None]


def grid(points: int) -> Tensor:
    """``(points**2, 2)``: a regular grid of the square, corners included."""
    side = torch.linspace(-HALF_WIDTH, HALF_WIDTH, points)
    return torch.cartesian_prod(side, side)


class WaveFamily(CurveFamily):
    """Waves of amplitude 0.5-2, direction 0-pi, wavenumber 0.5-2, phase 0-pi; a [2-40-40-1] tanh
    net per device, 100 noisy examples each."""

    name = "wave"
    arch = MLPSpec((2, 40, 40, 1), activation="tanh")
    descriptor = DescriptorSpec(("amplitude", "direction", "wavenumber", "phase"), (0.5, 0.0, 0.5, 0.0),
                                (2.0, math.pi, 2.0, math.pi))

    def function(self, tau: Tensor, x: Tensor) -> Tensor:
        return wave(tau, x)

    def _examples(self, tau: Tensor, n: int, seed: int) -> tuple[Tensor, Tensor]:
        gen = torch.Generator().manual_seed(seed)
        x = HALF_WIDTH * (2 * torch.rand(n, 2, generator=gen) - 1)
        return x, wave(tau, x)[0] + NOISE * torch.randn(n, 1, generator=gen)

    def eval_inputs(self) -> Tensor:
        return grid(20)

    def probe(self, seed: int = 0) -> Tensor:
        return grid(8)
