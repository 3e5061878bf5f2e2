"""The sine benchmark (Table 1): ``y = a sin(x + b)`` on ``x in [-5, 5]``, five domains.

Domain ``k = 0..4`` draws ``a ~ U[0.1 + 0.98k, 0.1 + 0.98(k+1)]`` and
``b ~ U[k pi/5, (k+1) pi/5]``; the descriptor is ``tau = (a, b)``. Scores are normalized RMSE on
200 evenly spaced points: ``RMSE / (max y - min y) = RMSE / (2|a|)`` (the zero predictor scores
``1 / (2 sqrt 2) = 0.354``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fedfuse.architectures import MLPSpec
from fedfuse.training import train_networks
from fedfuse.tasks.family import DescriptorSpec, DeviceConfig, LocalData, Recipe, Score, TaskFamily

SPEC = MLPSpec((1, 100, 1))
X_RANGE = (-5.0, 5.0)
NUM_DOMAINS = 5
EVAL_POINTS = 200


@dataclass(frozen=True)
class SineTasks:
    """A batch of sine tasks: amplitudes ``a``, phases ``b`` and their domain ``k``."""

    a: Tensor
    b: Tensor
    domain: Tensor

    def __len__(self) -> int:
        return self.a.numel()

    @property
    def tau(self) -> Tensor:
        return torch.stack([self.a, self.b], dim=1)

    def __call__(self, x: Tensor) -> Tensor:
        """Targets for inputs ``x`` ``(q, N, 1)`` (or ``(N, 1)`` shared by every task)."""
        a, b = self.a[:, None, None], self.b[:, None, None]
        return a * torch.sin(x + b)

    def subset(self, index: Tensor | list[int]) -> "SineTasks":
        idx = torch.as_tensor(index)
        return SineTasks(self.a[idx], self.b[idx], self.domain[idx])


def sample_tasks(n: int, seed: int) -> SineTasks:
    """``n`` tasks balanced over the five domains (domain ``i % 5`` for task ``i``)."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.arange(n) % NUM_DOMAINS
    u, v = torch.rand(n, generator=gen), torch.rand(n, generator=gen)
    a = 0.1 + 0.98 * (k + u)
    b = (k + v) * math.pi / NUM_DOMAINS
    return SineTasks(a, b, k)


def sample_x(n_tasks: int, shots: int, seed: int) -> Tensor:
    """``shots`` inputs per task drawn uniformly from ``[-5, 5]``: ``(n_tasks, shots, 1)``."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = X_RANGE
    return lo + (hi - lo) * torch.rand(n_tasks, shots, 1, generator=gen)


def eval_grid() -> Tensor:
    return probe_grid(EVAL_POINTS)


def nrmse(spec: MLPSpec, weights: Tensor, tasks: SineTasks) -> Tensor:
    """Normalized RMSE of each network ``(q, d)`` on its own task, ``(q,)``."""
    x = eval_grid()
    with torch.no_grad():
        pred = spec.forward(weights, x)
    rmse = ((pred - tasks(x)) ** 2).mean(dim=(1, 2)).sqrt()
    return rmse / (2 * tasks.a.abs())


def pretrain(tasks: SineTasks, seed: int, points: int = 200, steps: int = 1000,
             spec: MLPSpec = SPEC) -> Tensor:
    """What each device does on its own: a fresh random init, trained on its private points.

    The devices are simulated in one batched tensor, but every network has its own init, its
    own data and its own (separable) Adam run.
    """
    gen = torch.Generator().manual_seed(seed)
    init = spec.init(len(tasks), gen)
    x = sample_x(len(tasks), points, seed + 1)
    return train_networks(spec, init, x, tasks(x), steps=steps, lr=1e-2)


TEST_SEED_OFFSET = 7919  # new devices draw their tasks from a stream disjoint from the zoo's


class SineFamily(TaskFamily):
    """``y = a sin(x + b)``: a [1-100-1] regression net per task, descriptor ``(a, b)``."""

    name = "sine"
    arch = SPEC
    descriptor = DescriptorSpec(("amplitude", "phase"), (0.1, 0.0), (5.0, math.pi))
    loss = "mse"
    score = Score("nRMSE", higher_is_better=False)
    recipe = Recipe(train_steps=1000, train_lr=1e-2, finetune_steps=500, finetune_lr=1e-2)
    train_points = 200

    def simulated_device(self, index: int, cfg: DeviceConfig) -> LocalData:
        x_eval = eval_grid()
        if index < cfg.num_clients:
            task = sample_tasks(cfg.num_clients, cfg.seed).subset([index])
            x = sample_x(1, self.train_points, cfg.seed * 100_003 + index)[0]
            cid, role = f"sine-{index:05d}", "zoo"
        else:
            j = index - cfg.num_clients
            task = sample_tasks(max(cfg.num_new, j + 1), cfg.seed + TEST_SEED_OFFSET).subset([j])
            x = sample_x(1, cfg.shots, cfg.seed * 100_003 + 50_000 + j)[0]
            cid, role = f"new-{j:05d}", "new"
        return LocalData(cid, role, task.tau[0].tolist(), x, task(x)[0], x_eval, task(x_eval)[0])

    def evaluate(self, weights: Tensor, data: LocalData) -> Tensor:
        """Normalized RMSE on the held-back examples: RMSE / (max y - min y)."""
        with torch.no_grad():
            pred = self.arch.forward(weights, data.x_eval)
        rmse = ((pred - data.y_eval) ** 2).mean(dim=(-1, -2)).sqrt()
        return rmse / (data.y_eval.max() - data.y_eval.min()).clamp_min(1e-12)

    def probe(self, seed: int = 0) -> Tensor:
        return probe_grid()


def probe_grid(points: int = 64) -> Tensor:
    """The server's own inputs: an even grid over the task's input range (no client data)."""
    return torch.linspace(*X_RANGE, points)[:, None]
