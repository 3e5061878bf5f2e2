"""Local training of a batch of networks, each on its own data: a device training its own model,
a new device's cold start, a baseline's fine-tuning."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from fedfuse.architectures import Architecture
from fedfuse.progress import progress_bar


def loss_fn(spec: Architecture, flat: Tensor, x: Tensor, y: Tensor, kind: str) -> Tensor:
    """Per-network loss ``(q,)``: mean squared error or cross-entropy (``y`` class indices)."""
    out = spec.forward(flat, x)
    if kind == "mse":
        return ((out - y) ** 2).mean(dim=(-1, -2))
    if kind == "ce":
        return torch.nn.functional.cross_entropy(
            out.transpose(-1, -2), y, reduction="none"
        ).mean(-1)
    raise ValueError(f"unknown loss {kind!r}; use 'mse' or 'ce'")


def train_networks(
    spec: Architecture,
    init: Tensor,
    x: Tensor,
    y: Tensor,
    steps: int = 200,
    lr: float = 1e-2,
    loss: str = "mse",
    batch_size: int | None = None,
    seed: int = 0,
    progress: bool = False,
    on_step: Callable[[int, Tensor], None] | None = None,
) -> Tensor:
    """Adam on each network's own data; ``init`` ``(q, d)``, ``x`` ``(q, k, in)``.

    The networks share one tensor but not their gradients: the summed loss separates per
    network and Adam's statistics are per weight, so this equals ``q`` independent runs.
    ``batch_size`` trains on a fresh random minibatch of each network's examples per step.
    ``on_step(step, weights)`` sees the weights after each step (1-based), e.g. to keep snapshots.
    """
    flat = init.detach().clone().requires_grad_(True)
    if x.shape[-2] == 0 or steps <= 0:
        return flat.detach()
    opt = torch.optim.Adam([flat], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    k = x.shape[-2]
    with progress_bar(progress, f"training {len(flat)} networks", total=steps) as bar:
        for step in range(1, steps + 1):
            xb, yb = x, y
            if batch_size is not None and batch_size < k:
                idx = torch.randperm(k, generator=gen)[:batch_size]
                xb, yb = x[..., idx, :], y[..., idx] if loss == "ce" else y[..., idx, :]
            opt.zero_grad()
            loss_fn(spec, flat, xb, yb, loss).sum().backward()
            opt.step()
            if on_step is not None:
                on_step(step, flat.detach())
            bar.update()
    return flat.detach()
