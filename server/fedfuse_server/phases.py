"""The server's three phases: collect the zoo, fit the meta-model, personalize new devices."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from rich.console import Console
from rich.table import Table

from fedfuse import wire
from fedfuse.errors import FedfuseError
from fedfuse.meta_model import MetaModel
from fedfuse.parallel import ParallelMap, serial_map
from fedfuse.runconfig import RunConfig
from fedfuse.screening import screen
from fedfuse.tasks import sine
from fedfuse_server.ray_map import RayMap
from fedfuse_server.store import ModelStore

log = logging.getLogger("fedfuse_server")


@dataclass
class CollectReport:
    accepted: list[str] = field(default_factory=list)
    declined: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)  # node or client -> reason
    failed: dict[int, str] = field(default_factory=dict)  # node id -> error / timeout

    def as_dict(self) -> dict[str, Any]:
        return {"accepted": self.accepted, "declined": self.declined, "rejected": self.rejected,
                "failed": {str(k): v for k, v in self.failed.items()}}


def wait_for_nodes(grid: Grid, expected: int, timeout: float) -> list[int]:
    """Node ids once ``expected`` devices are connected, or whatever is there at ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= expected or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    if len(nodes) < expected:
        log.warning("%d of %d expected devices connected after %.0fs; going on with them",
                    len(nodes), expected, timeout)
    return nodes


def _request(node: int, action: str, kind: str, extra: dict[str, Any] | None = None) -> Message:
    content = RecordDict({wire.CONFIG: ConfigRecord({wire.ACTION: action})})
    for name, record in (extra or {}).items():
        content[name] = record
    return Message(content, dst_node_id=node, message_type=kind)


def collect(grid: Grid, store: ModelStore, cfg: RunConfig) -> CollectReport:
    """One round: every connected device is asked once for its model; each valid upload is
    stored (replacing an earlier one from the same client id)."""
    nodes = wait_for_nodes(grid, cfg.num_clients + cfg.num_new, cfg.wait_for_nodes)
    replies = list(grid.send_and_receive([_request(n, wire.UPLOAD, MessageType.TRAIN) for n in nodes],
                                         timeout=cfg.round_timeout))
    report = CollectReport()
    answered = set()
    receipts: dict[int, tuple[str, str]] = {}
    try:
        existing = store.zoo()
        spec, tau_dim = existing.spec, existing.tau_dim
    except FedfuseError:
        spec, tau_dim = None, None
    for reply in replies:
        node = reply.metadata.src_node_id
        answered.add(node)
        if reply.has_error():
            report.failed[node] = reply.error.reason
            continue
        meta = dict(reply.content[wire.META]) if wire.META in reply.content else {}
        if meta.get(wire.STATUS) == wire.DECLINED:
            report.declined.append(str(meta.get("client-id", node)))
            continue
        who = str(meta.get("client-id", node))[:wire.MAX_CLIENT_ID]
        try:
            upload = wire.parse_upload_content(reply.content, spec, tau_dim)
        except (wire.UploadRejected, KeyError, TypeError, ValueError) as exc:
            reason = str(exc) if isinstance(exc, wire.UploadRejected) else f"malformed upload: {exc}"
            report.rejected[who] = reason
            receipts[node] = (wire.REJECTED, reason)
            log.warning("rejected upload from %s (node %s): %s", who, node, reason)
            continue
        spec, tau_dim = upload.spec, len(upload.tau)
        store.put(upload)
        report.accepted.append(upload.client_id)
        receipts[node] = (wire.ACCEPTED, "")
    for node in set(nodes) - answered:
        report.failed[node] = f"no reply within {cfg.round_timeout:.0f}s"
    send_receipts(grid, receipts, cfg)
    store.record_round("collect", report.as_dict())
    contacted = len(nodes) - len(report.declined)
    log.info("collect: %d accepted, %d declined, %d rejected, %d failed", len(report.accepted),
             len(report.declined), len(report.rejected), len(report.failed))
    if contacted and len(report.accepted) < cfg.quorum * contacted:
        raise FedfuseError(
            f"collect reached no quorum: {len(report.accepted)} valid uploads of {contacted} "
            f"devices asked (quorum {cfg.quorum:.0%}); the {len(report.accepted)} accepted are stored"
        )
    return report


def send_receipts(grid: Grid, receipts: dict[int, tuple[str, str]], cfg: RunConfig) -> None:
    """Tell every device that uploaded whether its upload was stored and, if not, exactly why."""
    if not receipts:
        return
    msgs = [_request(node, wire.RECEIPT, MessageType.QUERY,
                     {wire.META: ConfigRecord({wire.STATUS: status, wire.REASON: reason})})
            for node, (status, reason) in receipts.items()]
    answered = {r.metadata.src_node_id for r in grid.send_and_receive(msgs, timeout=min(cfg.round_timeout, 60))}
    missing = set(receipts) - answered
    if missing:
        log.warning("%d devices did not acknowledge their receipt (their uploads stand)", len(missing))


def probe_inputs(family: str) -> torch.Tensor | None:
    """Inputs the server can generate itself for function-space matching (no client data)."""
    if family == "sine":
        return torch.linspace(*sine.X_RANGE, 64)[:, None]
    return None


def make_pmap(cfg: RunConfig) -> ParallelMap:
    if cfg.parallel == "serial":
        return serial_map
    return RayMap(force=cfg.parallel == "ray")


def fit(store: ModelStore, cfg: RunConfig, pmap: ParallelMap | None = None,
        progress: bool = True) -> MetaModel:
    zoo = store.zoo()
    probe = probe_inputs(cfg.family)
    kept, report = screen(zoo, probe, threshold=cfg.screen)
    if report.excluded:
        log.warning("fit: excluded %d outlying models: %s", len(report.excluded), report.excluded)
    log.info("fit: %d models, %d weights each", len(kept), zoo.spec.num_weights)
    model = MetaModel(max_rounds=cfg.fit_rounds, steps_per_round=cfg.fit_steps, seed=cfg.seed,
                      pmap=pmap or make_pmap(cfg), progress=progress)
    model.fit(kept, probe=probe)
    store.save_meta_model(model)
    store.record_round("fit", {**report.as_dict(), "models": len(kept), "seconds": model.fit_seconds_,
                               "rounds": model.n_rounds_})
    log.info("fit: done in %.1fs, %d rounds", model.fit_seconds_, model.n_rounds_)
    return model


def personalize(grid: Grid, store: ModelStore, cfg: RunConfig, run: str) -> dict[str, dict[str, Any]]:
    """QUERY every device for its descriptor, then TRAIN each one not in the zoo with its
    personalized initializer; the devices fine-tune locally and send back metrics."""
    model = store.load_meta_model()
    known = set(store.ids())
    nodes = wait_for_nodes(grid, cfg.num_clients + cfg.num_new, cfg.wait_for_nodes)
    replies = grid.send_and_receive([_request(n, "describe", MessageType.QUERY) for n in nodes],
                                    timeout=cfg.round_timeout)
    targets: list[tuple[int, str, list[float]]] = []
    for reply in replies:
        if reply.has_error():
            log.warning("node %s did not describe itself: %s", reply.metadata.src_node_id, reply.error.reason)
            continue
        meta = dict(reply.content[wire.META])
        try:
            cid = wire.client_id_of(meta)
            tau = wire.parse_tau(meta, model.tau_dim)
        except wire.UploadRejected as exc:
            log.warning("node %s: %s", reply.metadata.src_node_id, exc)
            continue
        if cid not in known:
            targets.append((reply.metadata.src_node_id, cid, tau))
    if not targets:
        log.warning("personalize: no device outside the zoo answered")
        return {}
    post = model.personalize(torch.tensor([t for _, _, t in targets]))
    msgs = [
        _request(node, wire.PERSONALIZE, MessageType.TRAIN,
                 {wire.INIT: ArrayRecord({k: Array(v.numpy()) for k, v in wire.initializer_arrays(post, j).items()})})
        for j, (node, _, _) in enumerate(targets)
    ]
    by_node = {node: (cid, j) for j, (node, cid, _) in enumerate(targets)}
    results: dict[str, dict[str, Any]] = {}
    for reply in grid.send_and_receive(msgs, timeout=cfg.round_timeout):
        cid, j = by_node[reply.metadata.src_node_id]
        if reply.has_error():
            log.warning("device %s failed to fine-tune: %s", cid, reply.error.reason)
            continue
        metrics = {k: v for k, v in dict(reply.content[wire.METRICS]).items() if k in wire.METRIC_KEYS}
        metrics["code-variance"] = float(post.code_variance[j].mean())
        metrics["uncertainty"] = float(post.uncertainty[j])
        if post.low_confidence()[j]:
            log.warning("device %s: descriptor far from every training task (uncertainty %.2f): "
                        "its initializer is close to the population's", cid, metrics["uncertainty"])
        store.record_metrics(cid, run, metrics)
        results[cid] = metrics
    _print_results(results)
    return results


def _print_results(results: dict[str, dict[str, Any]]) -> None:
    table = Table(title="personalized devices (normalized RMSE on their own held-back examples)")
    for col in ("device", "shots", "ours 0-shot", "ours fine-tuned", "cold 0-shot", "cold fine-tuned"):
        table.add_column(col, justify="right")
    for cid, m in sorted(results.items()):
        table.add_row(cid, str(m["shots"]), *(f"{m[k]:.3f}" for k in (
            "score-0shot", "score-finetuned", "cold-score-0shot", "cold-score-finetuned")))
    Console().print(table)


def run_phases(grid: Grid, cfg: RunConfig, run: str) -> dict[str, Any]:
    store = ModelStore(cfg.store)
    log.info("store at %s; phases %s", store.root, cfg.phases)
    out: dict[str, Any] = {}
    for phase in cfg.phases:
        start = time.perf_counter()
        if phase == "collect":
            out["collect"] = collect(grid, store, cfg)
        elif phase == "fit":
            out["fit"] = fit(store, cfg)
        else:
            out["personalize"] = personalize(grid, store, cfg, run)
        out[f"{phase}_seconds"] = time.perf_counter() - start
    return out
