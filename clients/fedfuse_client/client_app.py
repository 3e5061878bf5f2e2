"""The device side: one-shot upload of a locally trained model; local fine-tuning of a
personalized initializer. Only weights, metadata and metrics ever leave the device."""

from __future__ import annotations

import logging
import zlib
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from fedfuse import wire
from fedfuse.finetune import condition_readout, finetune
from fedfuse.runconfig import RunConfig
from fedfuse_client.data import LocalData, local_data

log = logging.getLogger("fedfuse_client")


def _flat_record(weights: torch.Tensor) -> ArrayRecord:
    return ArrayRecord({wire.FLAT: Array(weights.detach().cpu().numpy().astype(np.float32))})


def upload_content(data: LocalData, cfg: RunConfig) -> RecordDict:
    """Train from this device's own random init on its own data; share weights + metadata."""
    if data.role != "zoo":
        return RecordDict({wire.META: ConfigRecord({"client-id": data.client_id,
                                                    wire.STATUS: wire.DECLINED})})
    gen = torch.Generator().manual_seed(zlib.crc32(data.client_id.encode()))
    init = data.spec.init(1, gen)
    weights = finetune(data.spec, init, data.x[None], data.y[None], cfg.train_steps, 1e-2)[0]
    meta = wire.upload_meta(data.client_id, data.spec, data.tau, data.x.shape[0])
    return RecordDict({wire.WEIGHTS: _flat_record(weights), wire.META: ConfigRecord(meta)})


def personalize_content(msg: Message, data: LocalData, cfg: RunConfig) -> RecordDict:
    """Adapt the initializer to the local shots (conditioning its readout under the prior the
    server sent, or plain fine-tuning without one); report scores on held-back examples, next to
    a cold start fine-tuned locally (the device's own baseline)."""
    arrays = {k: v.numpy() for k, v in msg.content[wire.INIT].items()}
    init = torch.from_numpy(arrays[wire.FLAT]).float()[None]
    data.spec.check_flat(init)
    gen = torch.Generator().manual_seed(zlib.crc32(data.client_id.encode()))
    cold = data.spec.init(1, gen)
    x, y = data.x[None], data.y[None]
    prior = wire.readout_prior(data.spec, init[0], arrays)
    tuned = (finetune(data.spec, init, x, y, cfg.finetune_steps, cfg.finetune_lr) if prior is None
             else condition_readout(data.spec, init, prior, x, y, "mse"))
    cold_tuned = finetune(data.spec, cold, x, y, cfg.finetune_steps, cfg.finetune_lr)
    metrics: dict[str, Any] = {
        "shots": int(data.x.shape[0]),
        "score-0shot": float(data.score(init)[0]),
        "score-finetuned": float(data.score(tuned)[0]),
        "cold-score-0shot": float(data.score(cold)[0]),
        "cold-score-finetuned": float(data.score(cold_tuned)[0]),
    }
    return RecordDict({wire.METRICS: MetricRecord(metrics)})


def build_client_app(mods: list[Mod] | None = None, **overrides: Any) -> ClientApp:
    """The ClientApp; ``overrides`` replace run-config keys (for tests and scripts) and
    ``mods`` wrap every exchange (Flower's middleware)."""
    app = ClientApp(mods=mods or [])

    def setup(context: Context) -> tuple[RunConfig, LocalData]:
        torch.set_num_threads(1)
        cfg = RunConfig.from_run_config(context.run_config, **overrides)
        return cfg, local_data(context.node_config, cfg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg, data = setup(context)
        action = msg.content[wire.CONFIG][wire.ACTION]
        if action == wire.UPLOAD:
            return Message(upload_content(data, cfg), reply_to=msg)
        if action == wire.PERSONALIZE:
            return Message(personalize_content(msg, data, cfg), reply_to=msg)
        raise ValueError(f"unknown action {action!r}")

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        _, data = setup(context)
        config = msg.content[wire.CONFIG] if wire.CONFIG in msg.content else {}
        if config.get(wire.ACTION) == wire.RECEIPT:
            receipt = msg.content[wire.META]
            if receipt[wire.STATUS] == wire.REJECTED:
                log.warning("device %s: the server rejected its upload: %s", data.client_id,
                            receipt[wire.REASON])
            else:
                log.info("device %s: upload accepted", data.client_id)
            return Message(RecordDict(), reply_to=msg)
        meta = ConfigRecord({"client-id": data.client_id, "tau": [float(t) for t in data.tau]})
        return Message(RecordDict({wire.META: meta}), reply_to=msg)

    return app


app = build_client_app()
