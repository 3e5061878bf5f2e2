"""A device's private data: generated in simulation, read from its own file in deployment.

In a simulation the node config holds Flower's ``partition-id``: the first ``num-clients``
partitions are devices with a trained model to share, the rest are new devices holding only
``shots`` examples plus held-back examples for their own evaluation. In a deployment the node
config names a file (``data=...``) written by :meth:`LocalData.save`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor

from fedfuse.errors import FedfuseError
from fedfuse.io import load_tensors, save_tensors
from fedfuse.layout import MLPSpec
from fedfuse.runconfig import RunConfig
from fedfuse.tasks import sine

FORMAT = "fedfuse.client_data/1"
TEST_SEED_OFFSET = 7919  # new devices draw their tasks from a stream disjoint from the zoo's


@dataclass
class LocalData:
    client_id: str
    role: str  # "zoo": has a trained model to share; "new": wants a personalized one
    spec: MLPSpec
    tau: list[float]
    x: Tensor
    y: Tensor
    x_eval: Tensor
    y_eval: Tensor

    def score(self, weights: Tensor) -> Tensor:
        """Normalized RMSE on the held-back examples: RMSE / (max y - min y), per network."""
        with torch.no_grad():
            pred = self.spec.forward(weights, self.x_eval)
        rmse = ((pred - self.y_eval) ** 2).mean(dim=(-1, -2)).sqrt()
        return rmse / (self.y_eval.max() - self.y_eval.min()).clamp_min(1e-12)

    def save(self, path: str | os.PathLike) -> None:
        save_tensors(path, {"x": self.x, "y": self.y, "x_eval": self.x_eval, "y_eval": self.y_eval},
                     {"format": FORMAT, "client_id": self.client_id, "role": self.role,
                      "spec": self.spec.to_dict(), "tau": self.tau})

    @classmethod
    def load(cls, path: str | os.PathLike, client_id: str | None = None) -> "LocalData":
        tensors, meta = load_tensors(path)
        if meta.get("format") != FORMAT:
            raise FedfuseError(f"{path} is not a fedfuse client data file ({FORMAT})")
        return cls(client_id or meta["client_id"], meta["role"], MLPSpec.from_dict(meta["spec"]),
                   meta["tau"], tensors["x"], tensors["y"], tensors["x_eval"], tensors["y_eval"])


def simulated_device(partition_id: int, cfg: RunConfig) -> LocalData:
    """The sine device behind a simulation partition (deterministic in the run's seed)."""
    if cfg.family != "sine":
        raise FedfuseError(f"family {cfg.family!r} has no simulated devices; use 'sine'")
    x_eval = sine.eval_grid()
    if partition_id < cfg.num_clients:
        task = sine.sample_tasks(cfg.num_clients, cfg.seed).subset([partition_id])
        x = sine.sample_x(1, cfg.train_points, cfg.seed * 100_003 + partition_id)[0]
        cid, role = f"sine-{partition_id:05d}", "zoo"
    else:
        j = partition_id - cfg.num_clients
        task = sine.sample_tasks(max(cfg.num_new, j + 1), cfg.seed + TEST_SEED_OFFSET).subset([j])
        x = sine.sample_x(1, cfg.shots, cfg.seed * 100_003 + 50_000 + j)[0]
        cid, role = f"new-{j:05d}", "new"
    return LocalData(cid, role, sine.SPEC, task.tau[0].tolist(), x, task(x)[0], x_eval,
                     task(x_eval)[0])


def local_data(node_config: Mapping[str, Any], cfg: RunConfig) -> LocalData:
    if "data" in node_config:
        return LocalData.load(str(node_config["data"]), node_config.get("client-id"))
    if "partition-id" in node_config:
        return simulated_device(int(node_config["partition-id"]), cfg)
    raise FedfuseError("node config needs data=<file> (deployment) or partition-id (simulation)")
