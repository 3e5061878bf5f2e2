"""What a device does on its own with its shots, inside Flower or not (the warm-start SDK uses
it without Flower): adapt a received initializer, or train a cold start when it has none."""

from __future__ import annotations

import zlib

import torch

from fedfuse import wire
from fedfuse.adaptation import condition_readout
from fedfuse.tasks import LocalData, TaskFamily
from fedfuse.training import train_networks


def device_seed(data: LocalData) -> int:
    """A device's own seed, from its client id: the same device draws the same init every run."""
    return zlib.crc32(data.client_id.encode())


def adapt(family: TaskFamily, init: wire.Initializer, data: LocalData) -> torch.Tensor:
    """The initializer adapted to the local shots: its readout conditioned on them under the
    prior the server sent (the device's own cross-validation decides how far, by the rule of the
    path that made the initializer); unchanged with fewer than two shots or without a prior."""
    weights = init.weights[None]
    if init.readout is None or len(data.y) < 2:
        return weights
    return condition_readout(family.arch, weights, init.readout, data.x[None], data.y[None],
                             family.loss, distilled=init.distilled)


def cold_start(family: TaskFamily, data: LocalData, steps: int = 0, lr: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fresh init from the device's own seed, and that init trained on the shots with the
    family's local recipe (``steps``/``lr`` 0: the recipe's): ``(1, d)`` each."""
    r = family.recipe
    init = family.arch.init(1, torch.Generator().manual_seed(device_seed(data)))
    trained = train_networks(family.arch, init, data.x[None], data.y[None], steps or r.finetune_steps,
                             lr or r.finetune_lr, loss=family.loss)
    return init, trained
