"""Every reply is handled on its own: whole Flower messages of any shape are taken or refused
with a reason (a FedfuseError, never another exception), and a reply that is an error, comes
from a node that was not asked, or carries NaN, huge or out-of-domain values is logged and
skipped while the phase goes on and writes its round report."""

import logging

import numpy as np
import pytest
import torch
from flwr.app import Error, Message, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedfuse import wire
from fedfuse.errors import FedfuseError
from fedfuse.records import from_records, to_records
from fedfuse.runconfig import RunConfig
from fedfuse.tasks import sine
from fedfuse_server.phases import Claims, CollectReport, ServerRun, fit, take_description, take_metrics
from fedfuse_server.store import ModelStore

PROPERTY = settings(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
ZEROS = torch.zeros(sine.SPEC.num_weights)


def _request(node: int, message_type: str) -> Message:
    return Message(RecordDict(), dst_node_id=node, message_type=message_type)


def _reply(content: RecordDict, node: int = 7, message_type: str = wire.UPLOAD) -> Message:
    return Message(content, reply_to=_request(node, message_type))


def _refused_with_a_reason(exc: FedfuseError) -> None:
    assert str(exc).strip(), f"{type(exc).__name__} without a reason"


# -- whole messages, one at a time ----------------------------------------------------------------
@pytest.fixture(scope="module")
def upload_run(tmp_path_factory):
    """A ServerRun on a store of its own; the grid is never used."""
    cfg = RunConfig(store=str(tmp_path_factory.mktemp("replies")), family="sine")
    return ServerRun(grid=None, cfg=cfg, run="1")


UPLOADS = st.builds(lambda cid, a: to_records(wire.upload(cid, sine.SPEC, ZEROS, [a, 1.0], 10)),
                    st.sampled_from(["dev-0", "dev-1", "dev-2"]), st.floats(0, 6))
DESCRIPTIONS = st.builds(lambda a: to_records(wire.description("new-0", [a, 1.0])), st.floats(-1, 6))
METRICS = st.builds(lambda s: to_records(wire.metrics(10, *s)), st.lists(st.floats(0, 2), min_size=4, max_size=4))


@settings(PROPERTY, max_examples=3000)
@given(data=st.data(), identity=st.sampled_from(["key:a", "key:b"]))
def test_any_upload_reply_is_stored_or_refused_with_a_reason(upload_run, flower_task, flower_messages, data,
                                                             identity):
    content = data.draw(flower_messages.contents(UPLOADS))
    report = CollectReport()
    try:
        upload = upload_run._parse_upload(_reply(content), identity, Claims(upload_run.store.bindings()), report)
    except FedfuseError as exc:
        _refused_with_a_reason(exc)
        assert report.accepted == []
        return
    if upload is None:
        assert len(report.declined) == 1
        return
    receipt = upload_run._store_uploads({1: (upload, identity)}, report)[1]
    if report.accepted:
        assert report.accepted == [upload.client_id] and receipt == wire.receipt(True)
    else:
        reason = report.rejected["node 1"]
        assert reason.strip() and receipt == wire.receipt(False, reason)


@settings(PROPERTY, max_examples=2500)
@given(data=st.data())
def test_any_description_reply_is_taken_or_refused_with_a_reason(flower_task, flower_messages, data):
    family = sine.SineFamily()
    try:
        cid, tau = take_description(_reply(data.draw(flower_messages.contents(DESCRIPTIONS)),
                                           message_type=wire.DESCRIBE), family)
    except FedfuseError as exc:
        _refused_with_a_reason(exc)
    else:
        assert isinstance(cid, str) and cid.isprintable()
        family.descriptor.check(tau)


@settings(PROPERTY, max_examples=2500)
@given(data=st.data())
def test_any_metrics_reply_is_taken_or_refused_with_a_reason(flower_task, flower_messages, data):
    try:
        metrics = take_metrics(_reply(data.draw(flower_messages.contents(METRICS)), message_type=wire.PERSONALIZE))
    except FedfuseError as exc:
        _refused_with_a_reason(exc)
    else:
        assert set(metrics) == set(wire.METRIC_KEYS)
        assert all(np.isfinite(v) and abs(v) <= wire.MAX_ABS_METRIC for v in metrics.values())


# -- whole phases with bad replies ----------------------------------------------------------------
class Device:
    """A fake device: answers each request with what ``answers`` says for its type (a
    RecordDict, an Error or None for no reply), from the node ``src`` (default: the one asked)."""

    def __init__(self, answers: dict, src: int | None = None) -> None:
        self.answers, self.src, self.receipts = answers, src, []

    def __call__(self, msg: Message) -> Message | None:
        kind = msg.metadata.message_type
        if kind == wire.RECEIPT:
            self.receipts.append(wire.parse_receipt(from_records(msg.content)))
            return Message(RecordDict(), reply_to=msg)
        answer = self.answers.get(kind)
        if answer is None:
            return None
        request = msg if self.src is None else _request(self.src, kind)
        return Message(answer, reply_to=request)


def _upload(cid: str, tau=(1.0, 1.0)) -> RecordDict:
    return to_records(wire.upload(cid, sine.SPEC, ZEROS, list(tau), 10))


def _no_line_breaks(caplog) -> None:
    """Client-provided text in a log line is escaped: one record, one line."""
    for record in caplog.records:
        assert "\n" not in record.getMessage() and "\r" not in record.getMessage(), record.getMessage()


def test_collect_skips_error_replies_unasked_nodes_and_bad_uploads_and_reports_them(tmp_path, flower_task, caplog):
    devices = {
        1: Device({wire.UPLOAD: _upload("good")}),
        2: Device({wire.UPLOAD: Error(code=3, reason="crashed\nINFO fedfuse_server: forged line")}),
        3: Device({wire.UPLOAD: _upload("stranger")}, src=99),  # a reply from a node that was not asked
        4: Device({wire.UPLOAD: _upload("far", (1e300, 1.0))}),
        5: Device({wire.UPLOAD: _upload("outside", (7.0, 1.0))}),  # amplitude outside the family's domain
        6: Device({wire.UPLOAD: _upload("new\nline")}),
    }
    cfg = RunConfig(store=str(tmp_path), num_clients=6, num_new=0, wait_for_nodes=0, quorum=0.1, phase="collect")
    with caplog.at_level(logging.INFO):
        report = ServerRun(flower_task(devices), cfg, "1").collect()
    assert report.accepted == ["good"] and ModelStore(tmp_path).ids() == ["good"]
    assert "crashed" in report.failed[2]
    assert report.rejected["node 99"] == "a reply from a node that was not asked"
    assert "beyond" in report.rejected["node 4"] and "outside the family's domain" in report.rejected["node 5"]
    assert "printable" in report.rejected["node 6"]
    assert devices[3].receipts == []  # nothing is sent to a node that was not asked
    assert ModelStore(tmp_path).rounds("collect")[-1]["rejected"]["node 99"] == report.rejected["node 99"]
    _no_line_breaks(caplog)


@pytest.fixture(scope="module")
def fitted(small_sine_zoo, tmp_path_factory):
    """A store holding a small zoo (bound to its devices) and a meta-model fitted on it."""
    from fedfuse.wire import Upload

    root = tmp_path_factory.mktemp("fitted")
    store = ModelStore(root)
    _, zoo = small_sine_zoo
    for cid, w, tau in zip(zoo.ids, zoo.weights, zoo.tau):
        store.put(Upload(cid, zoo.spec, w, tau.tolist(), 100), node=f"key:{cid}")
    cfg = RunConfig(store=str(root), fit_rounds=1, fit_steps=5, parallel="serial", screen=0.0)
    fit(store, cfg, progress=False)
    return root


def _metrics(*scores) -> RecordDict:
    return to_records(wire.metrics(10, *scores))


def test_personalize_skips_bad_descriptions_and_metrics_and_reports_them(fitted, flower_task, caplog):
    good = _metrics(0.1, 0.05, 0.4, 0.2)
    bad_metrics = to_records(wire.Payload(metrics={**dict(_metrics(0.1, 0.05, 0.4, 0.2)["metrics"]),
                                                   "score-0shot": float("nan")}))
    huge = to_records(wire.Payload(metrics={**dict(good["metrics"]), "score-adapted": 1e300}))

    def new(cid, tau=(1.0, 1.0), metrics=good, src=None):
        return Device({wire.DESCRIBE: to_records(wire.description(cid, list(tau))), wire.PERSONALIZE: metrics}, src)

    devices = {
        1: new("new-ok"),
        2: new("new-nan", metrics=bad_metrics),
        3: new("new-huge", metrics=huge),
        4: new("new-crash", metrics=Error(code=3, reason="out of memory\nforged")),
        5: Device({wire.DESCRIBE: Error(code=3, reason="no descriptor\nforged")}),
        6: new("new-far", (1e300, 1.0)),
        7: new("new-outside", (7.0, 1.0)),
        8: new("stranger", src=99),
        9: new("new-ok"),  # a second device claiming the same id
        10: new("c0"),  # a zoo device's id, bound to it
        11: new("new\nline"),
    }
    cfg = RunConfig(store=str(fitted), num_clients=0, num_new=len(devices), wait_for_nodes=0, phase="personalize")
    with caplog.at_level(logging.INFO):
        results = ServerRun(flower_task(devices), cfg, "2").personalize()
    assert sorted(results) == ["new-ok"]
    report = ModelStore(fitted).rounds("personalize")[-1]
    assert report["personalized"] == ["new-ok"]
    skipped = report["skipped"]
    assert "finite" in skipped["new-nan"] and "finite" in skipped["new-huge"]
    assert "out of memory" in skipped["new-crash"] and "no descriptor" in skipped["node 5"]
    assert "beyond" in skipped["node 6"] and "outside the family's domain" in skipped["node 7"]
    assert skipped["node 99"] == "a reply from a node that was not asked"
    assert skipped["node 9"] == "client id 'new-ok' was already claimed by another device in this round"
    assert skipped["node 10"] == "client id 'c0' is bound to another device"
    assert "printable" in skipped["node 11"]
    assert ModelStore(fitted).metrics("2").keys() == {"new-ok"}
    _no_line_breaks(caplog)
