"""MNIST K-subset tasks (Table 2): classify among the K digits a task names.

The descriptor is the 10-bit indicator of the task's digits. For each K in 2..5 there are 40
training and 15 unseen test tasks; K = 2 has only 45 digit pairs, so 40 train and the other 5
test. A training device holds images of its digits from MNIST's training split; test tasks are
scored by K-way accuracy on the MNIST test images of their digits.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from fedfuse.architectures import MLPSpec, ModuleSpec
from fedfuse.datasets import kway_accuracy, load_mnist
from fedfuse.training import train_networks
from fedfuse.tasks.family import DescriptorSpec, DeviceConfig, LocalData, Recipe, Score, TaskFamily

SPEC = MLPSpec((784, 100, 10))
KS = (2, 3, 4, 5)


@dataclass(frozen=True)
class DigitTask:
    digits: tuple[int, ...]

    @property
    def tau(self) -> Tensor:
        t = torch.zeros(10)
        t[list(self.digits)] = 1.0
        return t


def sample_tasks(seed: int, n_train: int = 40, n_test: int = 15) -> tuple[list[DigitTask], list[DigitTask]]:
    """Disjoint training and test digit subsets for every K (all of them when fewer exist)."""
    rng = random.Random(seed)
    train, test = [], []
    for k in KS:
        subsets = list(itertools.combinations(range(10), k))
        rng.shuffle(subsets)
        n_tr = min(n_train, len(subsets))
        train += [DigitTask(s) for s in subsets[:n_tr]]
        test += [DigitTask(s) for s in subsets[n_tr : n_tr + n_test]]
    return train, test


def task_data(task: DigitTask, images: Tensor, labels: Tensor, n: int | None, seed: int) -> tuple[Tensor, Tensor]:
    """``n`` images of the task's digits (all of them if ``None``), drawn with ``seed``."""
    idx = torch.nonzero(torch.isin(labels, torch.tensor(task.digits))).flatten()
    if n is not None:
        gen = torch.Generator().manual_seed(seed)
        idx = idx[torch.randperm(len(idx), generator=gen)[:n]]
    return images[idx], labels[idx]


def shots_per_digit(task: DigitTask, images: Tensor, labels: Tensor, k: int, seed: int) -> tuple[Tensor, Tensor]:
    """``k`` examples of each of the task's digits (the k-shot fine-tuning set)."""
    gen = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for d in task.digits:
        idx = torch.nonzero(labels == d).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)[:k]]
        xs.append(images[idx]), ys.append(labels[idx])
    return torch.cat(xs), torch.cat(ys)


def pretrain(tasks: list[DigitTask], images: Tensor, labels: Tensor, seed: int,
             per_task: int = 1000, steps: int = 300) -> Tensor:
    """Each device: its own random init, trained on its own ``per_task`` images."""
    pools = [task_data(t, images, labels, per_task, seed + i) for i, t in enumerate(tasks)]
    return pretrain_on(pools, seed, steps)


def pretrain_on(pools: list[tuple[Tensor, Tensor]], seed: int, steps: int = 300,
                batch_size: int = 100, progress: bool = False) -> Tensor:
    """Train one net per device's own ``(images, labels)`` (equal sizes), each from its own
    init, with minibatch Adam as a device would."""
    init = SPEC.init(len(pools), torch.Generator().manual_seed(seed))
    x = torch.stack([p[0] for p in pools])
    y = torch.stack([p[1] for p in pools])
    return train_networks(SPEC, init, x, y, steps=steps, lr=1e-3, loss="ce", batch_size=batch_size,
                    seed=seed, progress=progress)


def accuracy(weights: Tensor, tasks: list[DigitTask], images: Tensor, labels: Tensor) -> Tensor:
    """K-way accuracy of each network on the given images of its task's digits."""
    out = []
    with torch.no_grad():
        for w, t in zip(weights, tasks):
            x, y = task_data(t, images, labels, None, 0)
            out.append(kway_accuracy(SPEC.forward(w, x), y, list(t.digits)))
    return torch.stack(out)


@lru_cache(maxsize=2)
def _images(split: str) -> tuple[Tensor, Tensor]:
    return load_mnist(split)


class MnistFamily(TaskFamily):
    """K-subset digit classifiers [784-100-10]; the descriptor is the task's 10-bit indicator."""

    name = "mnist"
    arch = SPEC
    descriptor = DescriptorSpec(tuple(f"digit {d}" for d in range(10)), (0.0,) * 10, (1.0,) * 10)
    loss = "ce"
    score = Score("K-way accuracy", higher_is_better=True)
    recipe = Recipe(train_steps=300, train_lr=1e-3, finetune_steps=100, finetune_lr=1e-3, batch_size=100)
    # a narrower decoder keeps the fit of 160 [784-100-10] nets near 2 min here; small PIC
    # blocks because the more local the prior, the better unseen digit sets decoded
    meta_settings = {"hidden": (256, 64), "batch_size": 32, "max_rounds": 5, "steps_per_round": 200,
                     "gp_steps": 30, "block_size": 8}
    images_per_device = 1000
    eval_images = 500
    probe_images = 1000

    def simulated_device(self, index: int, cfg: DeviceConfig) -> LocalData:
        train, test = sample_tasks(cfg.seed)
        x_train, y_train = _images("train")
        if index < cfg.num_clients:
            task = train[index % len(train)]
            x, y = task_data(task, x_train, y_train, self.images_per_device, cfg.seed + 1 + index)
            empty = torch.zeros(0, x.shape[1])
            return LocalData(f"mnist-{index:05d}", "zoo", task.tau.tolist(), x, y, empty, torch.zeros(0, dtype=torch.long))
        j = index - cfg.num_clients
        task = test[j % len(test)]
        x, y = shots_per_digit(task, x_train, y_train, cfg.shots, cfg.seed + 5000 + j)
        x_eval, y_eval = task_data(task, *_images("test"), self.eval_images, cfg.seed + 9000 + j)
        return LocalData(f"new-{j:05d}", "new", task.tau.tolist(), x, y, x_eval, y_eval)

    def evaluate(self, weights: Tensor, data: LocalData) -> Tensor:
        """K-way accuracy (the argmax over the task's own digits) on the held-back images."""
        digits = [d for d, bit in enumerate(data.tau) if bit > 0.5]
        with torch.no_grad():
            return kway_accuracy(self.arch.forward(weights, data.x_eval), data.y_eval, digits)

    def probe(self, seed: int = 0) -> Tensor:
        """Unlabeled images of MNIST's training split (public data the server holds)."""
        x_train, _ = _images("train")
        gen = torch.Generator().manual_seed(seed + 17)
        return x_train[torch.randperm(len(x_train), generator=gen)[: self.probe_images]]


class MnistCnnFamily(MnistFamily):
    """The same tasks with a small CNN (two convolutions, one hidden layer): channels and hidden
    units are the symmetries the alignment works on."""

    name = "mnist-cnn"
    arch = ModuleSpec("small-cnn", {})
    recipe = Recipe(train_steps=400, train_lr=3e-3, finetune_steps=100, finetune_lr=1e-3, batch_size=100)
    meta_settings = {"hidden": (128, 64), "batch_size": 32, "max_rounds": 4, "steps_per_round": 150,
                     "gp_steps": 30, "block_size": 8}
    probe_images = 256
