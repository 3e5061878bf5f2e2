"""A device's private data: its family simulates it, or its own file holds it (deployment).

In a simulation the node config holds Flower's ``partition-id``: the first ``num-clients``
partitions are devices with a trained model to share, the rest are new devices holding only
``shots`` examples plus held-back examples for their own evaluation. In a deployment the node
config names a file (``data=...``) written by :meth:`fedfuse.tasks.LocalData.save`.
"""

from __future__ import annotations

from typing import Any, Mapping

from fedfuse.errors import FedfuseError
from fedfuse.runconfig import RunConfig
from fedfuse.tasks import DeviceConfig, LocalData, TaskFamily


def device_config(cfg: RunConfig) -> DeviceConfig:
    return DeviceConfig(cfg.num_clients, cfg.num_new, cfg.seed, cfg.shots)


def local_data(node_config: Mapping[str, Any], cfg: RunConfig, family: TaskFamily) -> LocalData:
    if "data" in node_config:
        return LocalData.load(str(node_config["data"]), cfg.family, node_config.get("client-id"))
    if "partition-id" in node_config:
        return family.simulated_device(int(node_config["partition-id"]), device_config(cfg))
    raise FedfuseError("node config needs data=<file> (deployment) or partition-id (simulation)")
