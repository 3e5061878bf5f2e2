"""The server's three phases for any task family: collect the zoo, fit the meta-model,
personalize new devices. Every device's reply is handled on its own: whatever one device sends,
the round goes on and that device is told why it was refused."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedfuse import wire
from fedfuse.errors import FedfuseError, MessageRejected
from fedfuse.meta_model import MetaModel
from fedfuse.parallel import ParallelMap, serial_map
from fedfuse.records import from_records, to_records
from fedfuse.runconfig import RunConfig
from fedfuse.screening import screen
from fedfuse.tasks import TaskFamily, get_family
from fedfuse_server.ray_map import RayMap
from fedfuse_server.report import print_personalized
from fedfuse_server.store import ModelStore

log = logging.getLogger("fedfuse_server")


@dataclass
class CollectReport:
    accepted: list[str] = field(default_factory=list)
    declined: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)  # client id (or node) -> reason
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


def _request(node: int, message_type: str, payload: wire.Payload | None = None) -> Message:
    content = to_records(payload) if payload is not None else RecordDict()
    return Message(content, dst_node_id=node, message_type=message_type)


def make_pmap(cfg: RunConfig) -> ParallelMap:
    if cfg.parallel == "serial":
        return serial_map
    return RayMap(force=cfg.parallel == "ray")


class ServerRun:
    """One server run: the run config, its task family and its store, for every phase."""

    def __init__(self, grid: Grid, cfg: RunConfig, run: str) -> None:
        self.grid, self.cfg, self.run = grid, cfg, run
        self.family: TaskFamily = get_family(cfg.family)
        self.store = ModelStore(cfg.store)

    def phases(self) -> dict[str, Any]:
        """Run the configured phases; each one's seconds are recorded in the store's rounds
        table (phase ``phases``) even when one fails, so a benchmark reads them from the store."""
        log.info("store at %s; family %s; phases %s", self.store.root, self.family.name, self.cfg.phases)
        self.store.check_writable()  # a storage fault is named before any device is asked
        out: dict[str, Any] = {}
        seconds: dict[str, float] = {}
        try:
            for phase in self.cfg.phases:
                start = time.perf_counter()
                try:
                    out[phase] = getattr(self, phase)()
                finally:
                    seconds[phase] = out[f"{phase}_seconds"] = time.perf_counter() - start
        finally:
            self.store.record_round("phases", {"run": self.run, "seconds": seconds,
                                               "completed": [p for p in self.cfg.phases if p in out]})
        return out

    # -- collect --------------------------------------------------------------------------------
    def collect(self) -> CollectReport:
        """One round: every connected device is asked once for its model; each valid upload is
        stored (replacing an earlier one from the same client id)."""
        cfg = self.cfg
        nodes = wait_for_nodes(self.grid, cfg.num_clients + cfg.num_new, cfg.wait_for_nodes)
        replies = list(self.grid.send_and_receive([_request(n, wire.UPLOAD) for n in nodes],
                                                  timeout=cfg.round_timeout))
        report, receipts, answered = CollectReport(), {}, set()
        valid: dict[int, wire.Upload] = {}
        seen: set[str] = set()
        for reply in replies:
            node = reply.metadata.src_node_id
            answered.add(node)
            if reply.has_error():
                report.failed[node] = reply.error.reason
                continue
            try:
                upload = self._parse_upload(reply, report, seen)
            except Exception as exc:  # one reply must never cost the round
                receipts[node] = self._refuse(node, exc, report)
                continue
            if upload is not None:
                valid[node] = upload
                seen.add(upload.client_id)
        receipts |= self._store_uploads(valid, report)
        for node in set(nodes) - answered:
            report.failed[node] = f"no reply within {cfg.round_timeout:.0f}s"
        self._send_receipts(receipts)
        self.store.record_round("collect", report.as_dict())
        contacted = len(nodes) - len(report.declined)
        log.info("collect: %d accepted, %d declined, %d rejected, %d failed", len(report.accepted),
                 len(report.declined), len(report.rejected), len(report.failed))
        if contacted and len(report.accepted) < cfg.quorum * contacted:
            raise FedfuseError(
                f"collect reached no quorum: {len(report.accepted)} valid uploads of {contacted} devices "
                f"asked (quorum {cfg.quorum:.0%}); the {len(report.accepted)} accepted are stored")
        return report

    def _parse_upload(self, reply: Message, report: CollectReport, pending: set[str]) -> wire.Upload | None:
        """One device's upload, checked (``None`` for a decline); stored with the round's others."""
        payload = from_records(reply.content)
        if wire.is_decline(payload):
            report.declined.append(wire.parse_client_id(payload.config))
            return None
        upload = wire.parse_upload(payload, self.family.arch, self.family.descriptor.length)
        self.family.descriptor.check(upload.tau)
        if upload.client_id in pending:
            raise MessageRejected(f"client id {upload.client_id!r} was already uploaded in this round")
        return upload

    @staticmethod
    def _refuse(node: int, exc: Exception, report: CollectReport) -> wire.Payload:
        """The receipt refusing one upload, saying why: the device's fault in its own words, the
        server's without its details."""
        if isinstance(exc, FedfuseError):
            reason = str(exc)
            log.warning("rejected upload from node %s: %r", node, reason)
            report.rejected[f"node {node}"] = reason
            return wire.receipt(False, reason)
        log.error("upload from node %s could not be handled", node, exc_info=exc)
        report.rejected[f"node {node}"] = f"server error: {type(exc).__name__}"
        return wire.receipt(False, "the server could not store this upload")

    def _store_uploads(self, valid: dict[int, wire.Upload], report: CollectReport) -> dict[int, wire.Payload]:
        """Store the round's valid uploads in one transaction (:meth:`ModelStore.put_many`); every
        receipt is sent only after that, so an acknowledged upload is durable."""
        try:
            refused: list[Exception | None] = list(self.store.put_many(list(valid.values())))
        except Exception as exc:  # the store failed: no upload of this round is stored
            refused = [exc] * len(valid)
        receipts = {}
        for (node, upload), exc in zip(valid.items(), refused):
            if exc is None:
                report.accepted.append(upload.client_id)
                receipts[node] = wire.receipt(True)
            else:
                receipts[node] = self._refuse(node, exc, report)
        return receipts

    def _send_receipts(self, receipts: dict[int, wire.Payload]) -> None:
        """Tell every device that uploaded whether its upload was stored and, if not, why."""
        if not receipts:
            return
        msgs = [_request(node, wire.RECEIPT, payload) for node, payload in receipts.items()]
        answered = {r.metadata.src_node_id for r in self.grid.send_and_receive(
            msgs, timeout=min(self.cfg.round_timeout, 60))}
        if set(receipts) - answered:
            log.warning("%d devices did not acknowledge their receipt (their uploads stand)",
                        len(set(receipts) - answered))

    # -- fit ----------------------------------------------------------------------------------------
    def fit(self) -> MetaModel:
        return fit(self.store, self.cfg, family=self.family)

    # -- personalize ----------------------------------------------------------------------------
    def personalize(self) -> dict[str, dict[str, Any]]:
        """QUERY every device for its descriptor, then send each one not in the zoo its
        personalized initializer; the devices adapt it locally and send back metrics."""
        cfg, family = self.cfg, self.family
        model = self.store.load_meta_model()
        known = set(self.store.ids())
        nodes = wait_for_nodes(self.grid, cfg.num_clients + cfg.num_new, cfg.wait_for_nodes)
        targets: list[tuple[int, str, list[float]]] = []
        for reply in self.grid.send_and_receive([_request(n, wire.DESCRIBE) for n in nodes], timeout=cfg.round_timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("node %s did not describe itself: %r", node, reply.error.reason)
                continue
            try:
                cid, tau = wire.parse_description(from_records(reply.content), family.descriptor.length)
                family.descriptor.check(tau)
            except FedfuseError as exc:
                log.warning("node %s: %r", node, str(exc))
                continue
            if cid not in known:
                targets.append((node, cid, tau))
        if not targets:
            log.warning("personalize: no device outside the zoo answered")
            return {}
        import torch

        post = model.personalize(torch.tensor([t for _, _, t in targets]))
        msgs = [_request(node, wire.PERSONALIZE, wire.initializer(post, j)) for j, (node, _, _) in enumerate(targets)]
        by_node = {node: (cid, j) for j, (node, cid, _) in enumerate(targets)}
        results: dict[str, dict[str, Any]] = {}
        for reply in self.grid.send_and_receive(msgs, timeout=cfg.round_timeout):
            node = reply.metadata.src_node_id
            if node not in by_node:
                continue
            cid, j = by_node[node]
            if reply.has_error():
                log.warning("device %r failed to adapt its initializer: %r", cid, reply.error.reason)
                continue
            try:
                metrics: dict[str, Any] = wire.parse_metrics(from_records(reply.content))
            except FedfuseError as exc:
                log.warning("device %r sent unusable metrics: %r", cid, str(exc))
                continue
            metrics |= {"uncertainty": float(post.uncertainty[j]), "novelty": float(post.novelty[j])}
            if post.low_confidence()[j]:
                log.warning("device %r: descriptor far from every training task (novelty %.2f): its "
                            "initializer is close to the population's", cid, metrics["novelty"])
            self.store.record_metrics(cid, self.run, metrics)
            results[cid] = metrics
        print_personalized(results, family.score)
        return results


def meta_model(cfg: RunConfig, family: TaskFamily, pmap: ParallelMap | None = None,
               progress: bool = False) -> MetaModel:
    """An unfitted meta-model with the family's settings, the run config's overrides."""
    settings = family.meta_model_settings()
    if cfg.fit_rounds:
        settings["max_rounds"] = cfg.fit_rounds
    if cfg.fit_steps:
        settings["steps_per_round"] = cfg.fit_steps
    return MetaModel(**settings, seed=cfg.seed, pmap=pmap, progress=progress)


def fit(store: ModelStore, cfg: RunConfig, pmap: ParallelMap | None = None, progress: bool = True,
        family: TaskFamily | None = None) -> MetaModel:
    """Screen the stored zoo, fit the meta-model on the family's probe, store it."""
    family = family or get_family(cfg.family)
    zoo = store.zoo()
    probe = family.probe(cfg.seed)
    kept, report = screen(zoo, probe, threshold=cfg.screen)
    if report.excluded:
        log.warning("fit: excluded %d outlying models: %r", len(report.excluded), report.excluded)
    log.info("fit: %d models of %s", len(kept), zoo.spec)
    previous = store.load_meta_model() if cfg.fit_mode == "incremental" and store.meta_model_entry() else None
    model = meta_model(cfg, family, pmap or make_pmap(cfg), progress).fit(kept, probe=probe, previous=previous)
    model.annotations_ = {"family": cfg.family, "descriptor": list(family.descriptor.names)}
    store.save_meta_model(model)
    store.record_round("fit", {**report.as_dict(), "models": len(kept), "seconds": model.fit_seconds_,
                               "rounds": model.n_rounds_, "incremental": model.refit_})
    log.info("fit: done in %.1fs, %d rounds", model.fit_seconds_, model.n_rounds_)
    return model


def run_phases(grid: Grid, cfg: RunConfig, run: str) -> dict[str, Any]:
    return ServerRun(grid, cfg, run).phases()
