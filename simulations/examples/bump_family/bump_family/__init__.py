"""A user's own task family for fedfuse: each device fits a bump ``y = h exp(-(x - c)^2 / 2w^2)``.

Run it through Flower with ``--run-config "family='bump_family:BumpFamily'"`` once this package
is installed next to fedfuse (``pip install -e simulations/examples/bump_family``). Nothing in
fedfuse names it: the server and the devices learn everything from the family object.
``bump_family.steps:StepFamily`` is a second one, unlike it (noisy smooth steps, a ReLU net), and
``bump_family.waves:WaveFamily`` a third (noisy plane waves on a square: two inputs).
"""

from __future__ import annotations

from abc import abstractmethod

import torch
from torch import Tensor

from fedfuse.architectures import MLPSpec
from fedfuse.tasks import DescriptorSpec, DeviceConfig, LocalData, Recipe, Score, TaskFamily

X_RANGE = (-4.0, 4.0)


def bump(tau: Tensor, x: Tensor) -> Tensor:
    """``(q, N, 1)`` values of the bumps ``tau = (height, centre, width)`` ``(q, 3)`` at ``x``."""
    h, c, w = tau[:, 0, None, None], tau[:, 1, None, None], tau[:, 2, None, None]
    return h * torch.exp(-((x - c) ** 2) / (2 * w**2))


class CurveFamily(TaskFamily):
    """What the example families share: a device's task is a function of its descriptor
    (:meth:`function`), drawn uniformly over the descriptor's box; a zoo device learns it from 100
    examples, a new one has ``cfg.shots``; every device is scored by RMSE against the noiseless
    function at :meth:`eval_inputs`. Subclasses set the attributes and implement
    :meth:`function` and :meth:`_examples`."""

    loss = "mse"
    score = Score("RMSE", higher_is_better=False)
    recipe = Recipe(train_steps=800, train_lr=1e-2, finetune_steps=300, finetune_lr=1e-2)
    meta_settings = {"hidden": (64,), "max_rounds": 4, "steps_per_round": 150}

    @abstractmethod
    def function(self, tau: Tensor, x: Tensor) -> Tensor:
        """``(q, N, 1)`` values of the tasks ``tau`` ``(q, d)`` at ``x``."""

    @abstractmethod
    def _examples(self, tau: Tensor, n: int, seed: int) -> tuple[Tensor, Tensor]:
        """``n`` examples ``(x, y)`` of the task ``tau`` ``(1, d)``, drawn from ``seed``."""

    def eval_inputs(self) -> Tensor:
        """Where devices are scored (the probe grid unless a family says otherwise)."""
        return self.probe()

    def _tasks(self, n: int, seed: int) -> Tensor:
        return self.descriptor.uniform(n, torch.Generator().manual_seed(seed))

    def simulated_device(self, index: int, cfg: DeviceConfig) -> LocalData:
        x_eval = self.eval_inputs()
        if index < cfg.num_clients:
            tau = self._tasks(cfg.num_clients, cfg.seed)[index : index + 1]
            x, y = self._examples(tau, 100, cfg.seed * 1000 + index)
            cid, role = f"{self.name}-{index:04d}", "zoo"
        else:
            j = index - cfg.num_clients
            tau = self._tasks(max(cfg.num_new, j + 1), cfg.seed + 9973)[j : j + 1]
            x, y = self._examples(tau, cfg.shots, cfg.seed * 1000 + 500 + j)
            cid, role = f"new-{self.name}-{j:04d}", "new"
        return LocalData(cid, role, tau[0].tolist(), x, y, x_eval, self.function(tau, x_eval)[0])

    def evaluate(self, weights: Tensor, data: LocalData) -> Tensor:
        with torch.no_grad():
            return ((self.arch.forward(weights, data.x_eval) - data.y_eval) ** 2).mean(dim=(-1, -2)).sqrt()


class BumpFamily(CurveFamily):
    """Bumps of height 0.5-3, centre -2..2, width 0.3-1.5; a [1-32-32-1] tanh net per device,
    100 noiseless examples each."""

    name = "bump"
    arch = MLPSpec((1, 32, 32, 1), activation="tanh")
    descriptor = DescriptorSpec(("height", "centre", "width"), (0.5, -2.0, 0.3), (3.0, 2.0, 1.5))

    def function(self, tau: Tensor, x: Tensor) -> Tensor:
        return bump(tau, x)

    def _examples(self, tau: Tensor, n: int, seed: int) -> tuple[Tensor, Tensor]:
        lo, hi = X_RANGE
        x = lo + (hi - lo) * torch.rand(n, 1, generator=torch.Generator().manual_seed(seed))
        return x, bump(tau, x)[0]

    def probe(self, seed: int = 0) -> Tensor:
        return torch.linspace(*X_RANGE, 64)[:, None]
