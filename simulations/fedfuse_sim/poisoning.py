"""Poisoning the sine zoo: colluders and an extreme descriptor, with and without screening.

The attacks add uploads to an honest zoo. Colluders claim descriptors near one target task
(``spread`` apart) with models that compute ``-f`` (flipped: the honest model of the claimed
task with its readout negated) or ``f`` shifted in phase by pi/2 (trained on ``(a, b + pi/2)``),
so that each vouches for the others. The extreme descriptor is one device with a plausible
model (an honest one's) claiming a huge but finite descriptor. Each is judged by the 0-shot
nRMSE of the meta-model fitted on the honest zoo alone, on the attacked zoo after screening and
on the attacked zoo as it is: over all test tasks and over the test tasks nearest the attack.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fedfuse.meta_model import MetaModel
from fedfuse.screening import screen
from fedfuse.tasks import sine
from fedfuse.zoo import ModelZoo

TARGET = (2.5, 1.5)  # amplitude, phase: the middle of the third domain


@dataclass
class Attack:
    name: str
    weights: Tensor  # (m, d)
    tau: Tensor  # (m, D) the descriptors claimed
    target: Tensor  # (D,) the task the attack is aimed at

    def upon(self, zoo: ModelZoo) -> ModelZoo:
        """``zoo`` with the attackers' uploads (ids ``bad-j``) added."""
        m = len(self.tau)
        return ModelZoo(zoo.spec, torch.cat([zoo.weights, self.weights]), torch.cat([zoo.tau, self.tau]),
                        zoo.ids + [f"bad-{j}" for j in range(m)], zoo.n_examples + [200] * m)


def honest_zoo(n: int, seed: int, steps: int = 500) -> tuple[sine.SineTasks, ModelZoo]:
    tasks = sine.sample_tasks(n, seed=seed)
    weights = sine.pretrain(tasks, seed=seed + 1, points=100, steps=steps)
    return tasks, ModelZoo(sine.SPEC, weights, tasks.tau, [f"c{i:03d}" for i in range(n)], [100] * n)


def colluders(m: int, kind: str, spread: float, seed: int, steps: int = 500) -> Attack:
    """``m`` devices claiming descriptors around :data:`TARGET`, ``kind`` "flip" or "phase"."""
    gen = torch.Generator().manual_seed(seed)
    target = torch.tensor(TARGET)
    tau = target + spread * torch.randn(m, 2, generator=gen)
    shift = math.pi / 2 if kind == "phase" else 0.0
    trained = sine.SineTasks(tau[:, 0], tau[:, 1] + shift, torch.zeros(m, dtype=torch.long))
    weights = sine.pretrain(trained, seed=seed, points=100, steps=steps)
    if kind == "flip":
        readout = sine.SPEC.readout_index.flatten()
        weights[:, readout] = -weights[:, readout]
    return Attack(f"{m} colluders, {'flipped' if kind == 'flip' else 'phase +pi/2'}, spread {spread:g}",
                  weights, tau, target)


def extreme_descriptor(tasks: sine.SineTasks, zoo: ModelZoo, index: int = 0) -> Attack:
    """An honest model of task ``index`` claiming the descriptor (1e6, -1e6)."""
    return Attack("1 extreme descriptor (1e6, -1e6), plausible model", zoo.weights[index:index + 1].clone(),
                  torch.tensor([[1e6, -1e6]]), tasks.tau[index])


def zero_shot(zoo: ModelZoo, test: sine.SineTasks, **settings: Any) -> Tensor:
    """0-shot nRMSE ``(q,)`` of each test task under the meta-model fitted on ``zoo``."""
    model = MetaModel(**{"seed": 0, "max_rounds": 4, "steps_per_round": 150, **settings})
    model.fit(zoo, probe=sine.probe_grid())
    return sine.nrmse(sine.SPEC, model.personalize(test.tau).mean, test)


def nearest(test: sine.SineTasks, target: Tensor, count: int) -> Tensor:
    """The ``count`` test tasks nearest ``target`` (descriptors scaled by their domain's range)."""
    span = torch.tensor([4.9, math.pi])
    return ((test.tau - target) / span).norm(dim=1).argsort()[:count]


def evaluate(zoo: ModelZoo, attack: Attack, test: sine.SineTasks, honest: Tensor, near: int = 10,
             unscreened: bool = True, **settings: Any) -> dict[str, Any]:
    """One row: what screening caught, and 0-shot nRMSE honest / screened / unscreened (NaN
    with ``unscreened=False``: one fit fewer) over all test tasks and the ``near`` nearest the
    attack. ``honest``: the honest-only fit's per-task nRMSE."""
    attacked = attack.upon(zoo)
    kept, report = screen(attacked, sine.probe_grid())
    bad = {i for i in attacked.ids if i.startswith("bad-")}
    screened = zero_shot(kept, test, **settings)
    raw = zero_shot(attacked, test, **settings) if unscreened else torch.full_like(screened, math.nan)
    close = nearest(test, attack.target, near)
    return {"attack": attack.name, "caught": len(bad & set(report.excluded)), "attackers": len(bad),
            "false_positives": len(set(report.excluded) - bad),
            "all": (float(honest.mean()), float(screened.mean()), float(raw.mean())),
            "nearest": (float(honest[close].mean()), float(screened[close].mean()), float(raw[close].mean()))}
