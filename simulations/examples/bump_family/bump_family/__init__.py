"""A user's own task family for fedfuse: each device fits a bump ``y = h exp(-(x - c)^2 / 2w^2)``.

Run it through Flower with ``--run-config "family='bump_family:BumpFamily'"`` once this package
is installed next to fedfuse (``pip install -e simulations/examples/bump_family``). Nothing in
fedfuse names it: the server and the devices learn everything from the family object.
``bump_family.steps:StepFamily`` is a second one, unlike it (noisy smooth steps, a ReLU net), and
``bump_family.waves:WaveFamily`` a third (noisy plane waves on a square: two inputs).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedfuse.architectures import MLPSpec
from fedfuse.tasks import DescriptorSpec, DeviceConfig, LocalData, Recipe, Score, TaskFamily

X_RANGE = (-4.0, 4.0)


def bump(tau: Tensor, x: Tensor) -> Tensor:
    """``(q, N, 1)`` values of the bumps ``tau = (height, centre, width)`` ``(q, 3)`` at ``x``."""
    h, c, w = tau[:, 0, None, None], tau[:, 1, None, None], tau[:, 2, None, None]
    return h * torch.exp(-((x - c) ** 2) / (2 * w**2))


class BumpFamily(TaskFamily):
    """Bumps of height 0.5-3, centre -2..2, width 0.3-1.5; a [1-32-32-1] tanh net per device."""

    name = "bump"
    arch = MLPSpec((1, 32, 32, 1), activation="tanh")
    descriptor = DescriptorSpec(("height", "centre", "width"), (0.5, -2.0, 0.3), (3.0, 2.0, 1.5))
    loss = "mse"
    score = Score("RMSE", higher_is_better=False)
    recipe = Recipe(train_steps=800, train_lr=1e-2, finetune_steps=300, finetune_lr=1e-2)
    meta_settings = {"hidden": (64,), "max_rounds": 4, "steps_per_round": 150}

    def _tasks(self, n: int, seed: int) -> Tensor:
        return self.descriptor.uniform(n, torch.Generator().manual_seed(seed))

    def _inputs(self, n: int, seed: int) -> Tensor:
        lo, hi = X_RANGE
        return lo + (hi - lo) * torch.rand(n, 1, generator=torch.Generator().manual_seed(seed))

    def simulated_device(self, index: int, cfg: DeviceConfig) -> LocalData:
        grid = self.probe()
        if index < cfg.num_clients:
            tau = self._tasks(cfg.num_clients, cfg.seed)[index : index + 1]
            x = self._inputs(100, cfg.seed * 1000 + index)
            return LocalData(f"bump-{index:04d}", "zoo", tau[0].tolist(), x, bump(tau, x)[0], grid,
                             bump(tau, grid)[0])
        j = index - cfg.num_clients
        tau = self._tasks(max(cfg.num_new, j + 1), cfg.seed + 9973)[j : j + 1]
        x = self._inputs(cfg.shots, cfg.seed * 1000 + 500 + j)
        return LocalData(f"new-bump-{j:04d}", "new", tau[0].tolist(), x, bump(tau, x)[0], grid, bump(tau, grid)[0])

    def evaluate(self, weights: Tensor, data: LocalData) -> Tensor:
        with torch.no_grad():
            return ((self.arch.forward(weights, data.x_eval) - data.y_eval) ** 2).mean(dim=(-1, -2)).sqrt()

    def probe(self, seed: int = 0) -> Tensor:
        return torch.linspace(*X_RANGE, 64)[:, None]
