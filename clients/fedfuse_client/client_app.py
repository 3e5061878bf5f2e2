"""The device side, for any task family: one upload of a locally trained model, and local
adaptation of a personalized initializer. Only weights, metadata and metrics leave the device.

Messages are routed by their Flower type (:mod:`fedfuse.wire` lists them): ``train.upload``,
``query.describe``, ``query.receipt`` and ``train.personalize``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from fedfuse import wire
from fedfuse.records import from_records, to_records
from fedfuse.runconfig import RunConfig
from fedfuse.tasks import LocalData, TaskFamily, get_family
from fedfuse_client.data import local_data
from fedfuse_client.local import adapt, cold_start, device_seed
from fedfuse_client.warmstart import fetch_initializer

log = logging.getLogger("fedfuse_client")


def upload_payload(family: TaskFamily, data: LocalData, cfg: RunConfig) -> wire.Payload:
    """Train this device's own model from its own init on its own data and share it once; a
    new device has nothing to share and declines."""
    if data.role != "zoo":
        return wire.decline(data.client_id)
    weights = family.train(data, device_seed(data), cfg.train_steps or None)
    return wire.upload(data.client_id, family.arch, weights, data.tau, len(data.y))


def initializer_for(family: TaskFamily, data: LocalData, cfg: RunConfig, sent: wire.Payload) -> wire.Initializer:
    """The initializer a new device adapts: the one the server sent, or with ``initializer-url``
    set the one the initializer service returns for this device's descriptor (the server's is
    then ignored; a service that gives none fails this device's reply, naming why)."""
    if cfg.initializer_url:
        return fetch_initializer(cfg.initializer_url, data.client_id, data.tau, family.arch,
                                 distill=cfg.distill).initializer
    return wire.parse_initializer(sent, family.arch)


def metrics_payload(family: TaskFamily, init: wire.Initializer, data: LocalData, cfg: RunConfig) -> wire.Payload:
    """Scores on the held-back examples: the initializer as received and adapted, next to a cold
    start trained on the same shots with the family's local recipe (the device's own baseline)."""
    adapted = adapt(family, init, data)
    cold, cold_tuned = cold_start(family, data, cfg.finetune_steps, cfg.finetune_lr)
    score = lambda w: float(family.evaluate(w, data)[0])  # noqa: E731
    return wire.metrics(len(data.y), score(init.weights[None]), score(adapted), score(cold), score(cold_tuned))


def build_client_app(mods: list[Mod] | None = None, **overrides: Any) -> ClientApp:
    """The ClientApp; ``overrides`` replace run-config keys (for tests and scripts) and
    ``mods`` wrap every exchange (Flower's middleware)."""
    app = ClientApp(mods=mods or [])

    def setup(context: Context) -> tuple[RunConfig, TaskFamily, LocalData]:
        torch.set_num_threads(1)
        cfg = RunConfig.from_run_config(context.run_config, **overrides)
        family = get_family(cfg.family)
        return cfg, family, local_data(context.node_config, cfg, family)

    def reply(msg: Message, payload: wire.Payload) -> Message:
        return Message(to_records(payload), reply_to=msg)

    @app.train("upload")
    def upload(msg: Message, context: Context) -> Message:
        cfg, family, data = setup(context)
        return reply(msg, upload_payload(family, data, cfg))

    @app.query("describe")
    def describe(msg: Message, context: Context) -> Message:
        _, _, data = setup(context)
        return reply(msg, wire.description(data.client_id, data.tau))

    @app.query("receipt")
    def receipt(msg: Message, context: Context) -> Message:
        _, _, data = setup(context)
        accepted, reason = wire.parse_receipt(from_records(msg.content))
        if accepted:
            log.info("device %s: upload accepted", data.client_id)
        else:
            log.warning("device %s: the server rejected its upload: %r", data.client_id, reason)
        return Message(RecordDict(), reply_to=msg)

    @app.train("personalize")
    def personalize(msg: Message, context: Context) -> Message:
        cfg, family, data = setup(context)
        init = initializer_for(family, data, cfg, from_records(msg.content))
        return reply(msg, metrics_payload(family, init, data, cfg))

    return app


app = build_client_app()
