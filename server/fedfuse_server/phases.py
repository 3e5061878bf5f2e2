"""The server's three phases for any task family: collect the zoo, fit the meta-model,
personalize new devices. Every device's reply is handled on its own: whatever one device sends,
the round goes on and that device is told why it was refused.

A device is known by its node's identity (:func:`node_identities`), never by what it says: a
client id is bound to the device that first uploaded it, and another device using that id is
refused."""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.superlink.grid import InMemoryGrid

from fedfuse import wire
from fedfuse.errors import FedfuseError, MessageRejected, QuorumError
from fedfuse.meta_model import MetaModel
from fedfuse.parallel import ParallelMap, serial_map
from fedfuse.records import from_records, to_records
from fedfuse.runconfig import RunConfig
from fedfuse.screening import screen
from fedfuse.tasks import TaskFamily, get_family
from fedfuse_server.ray_map import RayMap
from fedfuse_server.report import print_personalized
from fedfuse_server.store import ModelStore, bound_elsewhere

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


NOT_ASKED = "a reply from a node that was not asked"


def node_identities(grid: Grid) -> dict[int, str]:
    """Each connected node's identity, the one client ids are bound to: the fingerprint of the
    public key the SuperLink knows the node by, or its node id where the grid names no key. With
    SuperNode authentication that key is the one registered for the node, and the SuperLink
    checks its signature on every request and that the request's node id is the key's, so the
    identity outlives node restarts, SuperLink restarts and re-registration of the same key;
    without authentication a SuperNode draws a new key whenever it starts, and in simulation
    every run draws new ones."""
    out = {}
    for info in grid.get_nodes():
        key = bytes(info.public_key)
        out[int(info.node_id)] = f"key:{hashlib.sha256(key).hexdigest()[:32]}" if key else f"node:{info.node_id}"
    return out


@dataclass
class Claims:
    """Which device may use which client id in one exchange: the store's bindings in force,
    then, for an id bound to no one, the first device that claims it in the exchange."""

    bound: dict[str, str]
    claimed: dict[str, str] = field(default_factory=dict)

    def claim(self, client_id: str, identity: str) -> None:
        """Refuse ``client_id`` to any device but its owner (MessageRejected)."""
        if self.bound.get(client_id, identity) != identity:
            raise bound_elsewhere(client_id)
        if self.claimed.setdefault(client_id, identity) != identity:
            raise MessageRejected(f"client id {client_id!r} was already claimed by another device in this round")


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
        # simulated nodes get new keys every run: their bindings hold for the run that made them
        self.scope = run if isinstance(grid, InMemoryGrid) else None

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
        stored (replacing an earlier one from the same client id and device)."""
        cfg = self.cfg
        nodes = wait_for_nodes(self.grid, cfg.num_clients + cfg.num_new, cfg.wait_for_nodes)
        asked, who = set(nodes), node_identities(self.grid)
        claims = Claims(self.store.bindings(self.scope))
        replies = list(self.grid.send_and_receive([_request(n, wire.UPLOAD) for n in nodes],
                                                  timeout=cfg.round_timeout))
        report, receipts, answered = CollectReport(), {}, set()
        valid: dict[int, tuple[wire.Upload, str]] = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            if node not in asked:
                report.rejected[f"node {node}"] = NOT_ASKED
                log.warning("ignored a reply from node %s: %s", node, NOT_ASKED)
                continue
            answered.add(node)
            if reply.has_error():
                report.failed[node] = reply.error.reason
                log.warning("node %s failed to upload: %r", node, reply.error.reason)
                continue
            identity = who.get(node, f"node:{node}")
            try:
                upload = self._parse_upload(reply, identity, claims, report)
            except Exception as exc:  # one reply must never cost the round
                receipts[node] = self._refuse(node, exc, report)
                continue
            if upload is not None:
                valid[node] = (upload, identity)
        receipts |= self._store_uploads(valid, report)
        for node in asked - answered:
            report.failed[node] = f"no reply within {cfg.round_timeout:.0f}s"
        self._send_receipts(receipts)
        self.store.record_round("collect", report.as_dict())
        contacted = len(nodes) - len(report.declined)
        log.info("collect: %d accepted, %d declined, %d rejected, %d failed", len(report.accepted),
                 len(report.declined), len(report.rejected), len(report.failed))
        if contacted and len(report.accepted) < cfg.quorum * contacted:
            raise QuorumError(
                f"collect reached no quorum: {len(report.accepted)} valid uploads of {contacted} devices "
                f"asked (quorum {cfg.quorum:.0%}); the {len(report.accepted)} accepted are stored")
        return report

    def _parse_upload(self, reply: Message, identity: str, claims: Claims,
                      report: CollectReport) -> wire.Upload | None:
        """The upload of the device ``identity``, checked (``None`` for a decline); stored with
        the round's others. Its client id is claimed before anything else is read, so that a
        later claim of the id in this round is refused even where this upload is."""
        payload = from_records(reply.content)
        if wire.is_decline(payload):
            report.declined.append(wire.parse_client_id(payload.config))
            return None
        claims.claim(wire.parse_client_id(payload.config), identity)
        upload = wire.parse_upload(payload, self.family.arch, self.family.descriptor.length)
        self.family.descriptor.check(upload.tau)
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
        log.error("upload from node %s could not be handled: %r", node, exc)
        log.debug("upload from node %s could not be handled", node, exc_info=exc)
        report.rejected[f"node {node}"] = f"server error: {type(exc).__name__}"
        return wire.receipt(False, "the server could not store this upload")

    def _store_uploads(self, valid: dict[int, tuple[wire.Upload, str]],
                       report: CollectReport) -> dict[int, wire.Payload]:
        """Store the round's valid uploads in one transaction (:meth:`ModelStore.put_many`); every
        receipt is sent only after that, so an acknowledged upload is durable."""
        uploads = [u for u, _ in valid.values()]
        try:
            refused: list[Exception | None] = list(self.store.put_many(
                uploads, nodes=[who for _, who in valid.values()], run=self.scope))
        except Exception as exc:  # the store failed: no upload of this round is stored
            refused = [exc] * len(valid)
        receipts = {}
        for (node, (upload, _)), exc in zip(valid.items(), refused):
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
        personalized initializer; the devices adapt it locally and send back metrics. A reply
        that cannot be used is logged and skipped; the round's report is stored either way."""
        cfg, family = self.cfg, self.family
        model = self.store.load_meta_model()
        known = set(self.store.ids())
        nodes = wait_for_nodes(self.grid, cfg.num_clients + cfg.num_new, cfg.wait_for_nodes)
        asked, who = set(nodes), node_identities(self.grid)
        claims = Claims(self.store.bindings(self.scope))
        report = PersonalizeReport()
        targets: list[tuple[int, str, list[float]]] = []
        for reply in self.grid.send_and_receive([_request(n, wire.DESCRIBE) for n in nodes], timeout=cfg.round_timeout):
            node = reply.metadata.src_node_id
            try:
                if node not in asked:
                    raise MessageRejected(NOT_ASKED)
                cid, tau = take_description(reply, family)
                claims.claim(cid, who.get(node, f"node:{node}"))
            except FedfuseError as exc:
                report.skip(f"node {node}", str(exc))
                continue
            if cid not in known:
                targets.append((node, cid, tau))
        results: dict[str, dict[str, Any]] = {}
        if targets:
            results = self._personalize(model, targets, report)
        else:
            log.warning("personalize: no device outside the zoo answered")
        self.store.record_round("personalize", report.as_dict())
        print_personalized(results, family.score)
        return results

    def _personalize(self, model: MetaModel, targets: list[tuple[int, str, list[float]]],
                     report: PersonalizeReport) -> dict[str, dict[str, Any]]:
        """Send each target its initializer; keep the metrics each sends back."""
        import torch

        # devices with an initializer-url ignore this message: distilling it would be wasted
        distill = self.cfg.distill and not self.cfg.initializer_url
        if distill and not model.distillable:
            log.warning("distill: this meta-model has no function-space head (no probe); "
                        "sending the fast initializers")
            distill = False
        post = model.personalize(torch.tensor([t for _, _, t in targets]), distill=distill)
        msgs = [_request(node, wire.PERSONALIZE, wire.initializer(post, j)) for j, (node, _, _) in enumerate(targets)]
        by_node = {node: (cid, j) for j, (node, cid, _) in enumerate(targets)}
        results: dict[str, dict[str, Any]] = {}
        for reply in self.grid.send_and_receive(msgs, timeout=self.cfg.round_timeout):
            node = reply.metadata.src_node_id
            if node not in by_node:
                report.skip(f"node {node}", NOT_ASKED)
                continue
            cid, j = by_node[node]
            try:
                metrics: dict[str, Any] = take_metrics(reply)
            except FedfuseError as exc:
                report.skip(cid, str(exc))
                continue
            metrics |= {"uncertainty": float(post.uncertainty[j]), "novelty": float(post.novelty[j])}
            if post.low_confidence()[j]:
                log.warning("device %r: descriptor far from every training task (novelty %.2f): its "
                            "initializer is close to the population's", cid, metrics["novelty"])
            self.store.record_metrics(cid, self.run, metrics)
            report.personalized.append(cid)
            results[cid] = metrics
        return results


@dataclass
class PersonalizeReport:
    personalized: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # client id (or node) -> reason

    def skip(self, who: str, reason: str) -> None:
        self.skipped[who] = reason
        log.warning("personalize: skipped %s: %r", who, reason)

    def as_dict(self) -> dict[str, Any]:
        return {"personalized": self.personalized, "skipped": self.skipped}


def take_description(reply: Message, family: TaskFamily) -> tuple[str, list[float]]:
    """A DESCRIBE reply's client id and descriptor, inside the family's domain; else
    MessageRejected (or DescriptorError) saying why."""
    if reply.has_error():
        raise MessageRejected(f"the device could not describe itself: {reply.error.reason}")
    cid, tau = wire.parse_description(from_records(reply.content), family.descriptor.length)
    family.descriptor.check(tau)
    return cid, tau


def take_metrics(reply: Message) -> dict[str, float]:
    """A PERSONALIZE reply's metrics, every one a finite number within bounds; else
    MessageRejected saying why."""
    if reply.has_error():
        raise MessageRejected(f"the device failed to adapt its initializer: {reply.error.reason}")
    return wire.parse_metrics(from_records(reply.content))


def meta_model(cfg: RunConfig, family: TaskFamily, pmap: ParallelMap | None = None,
               progress: bool = False) -> MetaModel:
    """An unfitted meta-model with the family's settings, the run config's overrides."""
    settings = family.meta_model_settings()
    if cfg.fit_rounds:
        settings["max_rounds"] = cfg.fit_rounds
    if cfg.fit_steps:
        settings["steps_per_round"] = cfg.fit_steps
    if cfg.distill_steps >= 0:
        settings["distill_steps"] = cfg.distill_steps
    return MetaModel(**settings, seed=cfg.seed, pmap=pmap, progress=progress)


def fit(store: ModelStore, cfg: RunConfig, pmap: ParallelMap | None = None, progress: bool = True,
        family: TaskFamily | None = None) -> MetaModel:
    """Screen the stored zoo, fit the meta-model on the family's probe, store it."""
    family = family or get_family(cfg.family)
    zoo = store.zoo()
    probe = family.probe(cfg.seed)
    kept, report = screen(zoo, probe, threshold=cfg.screen)
    if report.excluded:
        log.warning("fit: excluded %d outlying models: %r", len(report.excluded), report.reasons)
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
