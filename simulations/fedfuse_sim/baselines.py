"""The baselines of Tables 1-3, on the same networks and the same local fine-tuning as ours.

``nearest_neighbour`` and ``zoo_average`` use only what fedfuse's server has (the uploaded
weights and descriptors). :class:`MAML` does not: it needs every training task's raw data in one
place and synchronized second-order training rounds, which is what fedfuse is built to avoid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import grad, vmap

from fedfuse.training import loss_fn
from fedfuse.architectures import MLPSpec
from fedfuse.progress import progress_bar
from fedfuse.zoo import robust_scale

MAML_NOTE = ("MAML needs centralized, synchronized access to every training task's raw data "
             "(second-order meta-gradients each round); fedfuse only sees each device's weights once.")

# An episode batch: support inputs/targets and query inputs/targets, one row per task.
Episode = tuple[Tensor, Tensor, Tensor, Tensor]


def nearest_neighbour(tau: Tensor, weights: Tensor, query: Tensor) -> Tensor:
    """Copy the training model whose descriptor is closest (per-dimension standardized
    Euclidean distance) to each query descriptor."""
    scale = tau.std(0, unbiased=False).clamp_min(1e-8)
    dist = torch.cdist(query / scale, tau / scale)
    return weights[dist.argmin(1)].clone()


def zoo_average(weights: Tensor, n: int) -> Tensor:
    """One-shot FedAvg: the plain mean of the (unaligned) zoo, the same for every new task."""
    return weights.mean(0, keepdim=True).expand(n, -1).clone()


@dataclass
class MAML:
    """Second-order MAML (Finn et al., 2017) written with ``torch.func``.

    The inner loop is ``inner_steps`` SGD steps on a task's support set; the meta-gradient of
    the query loss flows through them (``grad`` inside ``vmap`` over the task batch).
    """

    spec: MLPSpec
    loss: str = "mse"
    inner_lr: float = 0.01
    inner_steps: int = 1
    meta_lr: float = 1e-3
    meta_steps: int = 5000
    seed: int = 0
    progress: bool = False

    def fit(self, episodes: Callable[[int], Episode], checkpoints: tuple[int, ...] = ()) -> "MAML":
        """``episodes(step)`` returns a batch ``(xs, ys, xq, yq)`` of training tasks;
        ``checkpoints_`` keeps the base net after each step count in ``checkpoints`` (how far
        more meta-steps carry it, from one run)."""
        gen = torch.Generator().manual_seed(self.seed)
        theta = self.spec.init(1, gen)[0].requires_grad_(True)
        opt = torch.optim.Adam([theta], lr=self.meta_lr)
        meta_loss = vmap(self._query_loss, in_dims=(None, 0, 0, 0, 0))
        self.history_: list[float] = []
        self.checkpoints_: dict[int, Tensor] = {}
        with progress_bar(self.progress, "MAML meta-training", total=self.meta_steps) as bar:
            for step in range(self.meta_steps):
                opt.zero_grad()
                loss = meta_loss(theta, *episodes(step)).mean()
                loss.backward()
                opt.step()
                self.history_.append(loss.detach().item())
                if step + 1 in checkpoints:
                    self.checkpoints_[step + 1] = theta.detach().clone()
                bar.update()
        self.theta_ = theta.detach()
        return self

    def _task_loss(self, w: Tensor, x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(self.spec, w[None], x[None], y[None], self.loss)[0]

    def adapt(self, w: Tensor, x: Tensor, y: Tensor, steps: int | None = None) -> Tensor:
        """MAML's own fine-tuning: plain SGD at ``inner_lr`` (``inner_steps`` by default)."""
        for _ in range(self.inner_steps if steps is None else steps):
            w = w - self.inner_lr * grad(self._task_loss)(w, x, y)
        return w

    def train_networks(self, x: Tensor, y: Tensor, steps: int) -> Tensor:
        """Every new task's own adaptation from the base net: ``x`` ``(q, k, in)``."""
        if x.shape[-2] == 0:
            return self.init(x.shape[0])
        with torch.no_grad():
            return vmap(lambda xi, yi: self.adapt(self.theta_, xi, yi, steps))(x, y)

    def _query_loss(self, w: Tensor, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Tensor:
        return self._task_loss(self.adapt(w, xs, ys), xq, yq)

    def init(self, n: int) -> Tensor:
        """The meta-learned base net, the same 0-shot initializer for every new task."""
        return self.theta_.expand(n, -1).clone()


@dataclass
class AlignedNeighbours:
    """The k-NN average of aligned neighbours: a new task gets the kernel-weighted average of
    its ``k`` nearest zoo models (robustly standardized descriptor distance, weights
    ``exp(-d^2 / 2h^2)``), their weights in the fitted canonical unit order. ``k`` and ``h`` are
    chosen by leave-one-out on the zoo: in function space on the probe when there is one, in
    weight space otherwise. Uses only what the server has, like ours."""

    ks: tuple[int, ...] = (1, 2, 4, 8, 16)
    bandwidths: tuple[float, ...] = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)

    def fit(self, spec: MLPSpec, aligned: Tensor, tau: Tensor, probe: Tensor | None = None) -> "AlignedNeighbours":
        self.spec_, self.aligned_ = spec, aligned
        self.loc_, self.scale_ = robust_scale(tau)
        self.z_ = z = self._z(tau)
        dist = torch.cdist(z, z)
        dist.fill_diagonal_(float("inf"))
        truth = self._signature(aligned, probe)
        spread = (truth - truth.mean(1, keepdim=True)).norm(dim=1).clamp_min(1e-12)
        scores = {}
        for k in (k for k in self.ks if k < len(tau)):
            d, idx = dist.topk(k, largest=False)
            for h in self.bandwidths:
                pred = self._average(d, idx, h)
                scores[(k, h)] = float(((self._signature(pred, probe) - truth).norm(dim=1) / spread).mean())
        self.k_, self.h_ = min(scores, key=scores.get)
        self.scores_ = scores
        return self

    def predict(self, query: Tensor) -> Tensor:
        d, idx = torch.cdist(self._z(query), self.z_).topk(min(self.k_, len(self.aligned_)), largest=False)
        return self._average(d, idx, self.h_)

    def _z(self, tau: Tensor) -> Tensor:
        return ((tau.double() - self.loc_) / self.scale_).float()

    def _average(self, d: Tensor, idx: Tensor, h: float) -> Tensor:
        w = torch.softmax(-(d**2) / (2 * h**2), dim=1)  # stable where every neighbour is far
        return (w[..., None] * self.aligned_[idx]).sum(1)

    def _signature(self, weights: Tensor, probe: Tensor | None) -> Tensor:
        if probe is None:
            return weights
        with torch.no_grad():
            return self.spec_.forward(weights, probe).flatten(1)
