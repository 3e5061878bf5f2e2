"""The protocol: every message round-trips through Flower records; malformed ones are refused
with a specific reason and never crash a parser."""

import io
import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedfuse import wire
from fedfuse.architectures import MLPSpec, VectorSpec
from fedfuse.errors import MessageRejected
from fedfuse.records import from_records, to_records

SPEC = MLPSpec((1, 4, 1))
GOOD = wire.upload("dev-1", SPEC, torch.zeros(SPEC.num_weights), [0.5, 1.0], 20)


def _parse(payload: wire.Payload, spec=SPEC, tau_dim=2) -> wire.Upload:
    return wire.parse_upload(from_records(to_records(payload)), spec, tau_dim)


def _with(config=None, arrays=None, metrics=None) -> wire.Payload:
    return wire.Payload({**GOOD.arrays, **(arrays or {})}, {**GOOD.config, **(config or {})}, metrics or {})


def test_a_good_upload_round_trips_through_flower_records():
    up = _parse(GOOD)
    assert up.client_id == "dev-1" and up.spec == SPEC and up.tau == [0.5, 1.0] and up.n_examples == 20
    assert torch.equal(up.weights, torch.zeros(SPEC.num_weights))


@pytest.mark.parametrize("change, reason", [
    ({"extra": 1}, "unexpected metadata keys \\['extra'\\]"),
    ({"client-id": ""}, "client-id must be a printable string"),
    ({"client-id": "x" * 500}, "client-id must be a printable string"),
    ({"client-id": "a\nb"}, "client-id must be a printable string"),
    ({"arch": "{not json"}, "bad architecture"),
    ({"arch": json.dumps({"kind": "mlp", "sizes": [1, 0, 1]})}, "bad architecture"),
    ({"arch": json.dumps({"kind": "lstm"})}, "unknown architecture kind"),
    ({"arch": "x" * 5000}, "JSON string of at most"),
    ({"arch": json.dumps(MLPSpec((1, 5, 1)).to_dict())}, "does not match the federation's"),
    ({"arch": json.dumps({"kind": "mlp", "sizes": [1, 4, 1], "activation": "swish"})}, "unknown activation"),
    ({"tau": []}, "tau must be a non-empty list"),
    ({"tau": [1.0, float("nan")]}, "non-finite entries"),
    ({"tau": [1e39, 1.0]}, "beyond"),  # finite in float64, infinite once stored as float32
    ({"tau": ["a", "b"]}, "tau must be a non-empty list of numbers"),
    ({"tau": [1.0, 2.0, 3.0]}, "descriptors have length 2"),
    ({"n-examples": -1}, "n-examples must be a non-negative integer"),
    ({"n-examples": True}, "n-examples must be a non-negative integer"),
])
def test_each_bad_metadata_gets_its_own_reason(change, reason):
    with pytest.raises(MessageRejected, match=reason):
        _parse(_with(config=change))


@pytest.mark.parametrize("weights, reason", [
    (np.full(SPEC.num_weights, np.nan, dtype=np.float32), "NaN or infinite"),
    (np.full(SPEC.num_weights, 1e6, dtype=np.float32), "absurd weight magnitude"),
    (np.zeros(SPEC.num_weights, dtype=np.int64), "float16/32/64"),
    (np.zeros((SPEC.num_weights, 1), dtype=np.float32), "expected \\(13,\\)"),
    (np.zeros(5, dtype=np.float32), "has shape \\(5,\\)"),
])
def test_each_bad_weight_array_gets_its_own_reason(weights, reason):
    with pytest.raises(MessageRejected, match=reason):
        _parse(_with(arrays={wire.FLAT: weights}))


def _npy_bytes(shape, dtype="<f4", body=b""):
    fh = io.BytesIO()
    np.lib.format.write_array_header_1_0(fh, {"descr": dtype, "fortran_order": False, "shape": shape})
    return fh.getvalue() + body


@pytest.mark.parametrize("data, reason", [
    (_npy_bytes((10**12,), body=b"\0" * 52), "header declares shape \\(1000000000000,\\)"),  # no allocation
    (_npy_bytes((13,), dtype="|O", body=b"\0" * 52), "float16/32/64"),
    (b"", "not a readable npy array"),
    (b"\x93NUMPY garbage", "not a readable npy array"),
])
def test_lying_or_broken_array_data_is_refused_before_it_is_decoded(data, reason):
    content = to_records(GOOD)
    content["arrays"] = ArrayRecord({wire.FLAT: Array(dtype="float32", shape=(13,), stype="numpy.ndarray", data=data)})
    with pytest.raises(MessageRejected, match=reason):
        wire.parse_upload(from_records(content), SPEC, 2)


def test_records_of_the_wrong_kind_or_name_are_refused():
    content = to_records(GOOD)
    with pytest.raises(MessageRejected, match="unexpected records"):
        from_records(RecordDict({**dict(content.items()), "data": ConfigRecord({"x": 1})}))
    with pytest.raises(MessageRejected, match="must be a ArrayRecord"):
        from_records(RecordDict({"arrays": ConfigRecord({"flat": 1}), "config": content["config"]}))
    with pytest.raises(MessageRejected, match="exactly one array"):
        _parse(_with(arrays={"x": np.zeros(2, dtype=np.float32)}))
    with pytest.raises(MessageRejected, match="carries no metrics"):
        _parse(_with(metrics={"loss": 1.0}))


def test_decline_description_receipt_and_metrics_round_trip():
    decline = from_records(to_records(wire.decline("new-1")))
    assert wire.is_decline(decline) and not wire.is_decline(from_records(to_records(GOOD)))
    cid, tau = wire.parse_description(from_records(to_records(wire.description("new-1", [1.0, 2.0]))), 2)
    assert cid == "new-1" and tau == [1.0, 2.0]
    with pytest.raises(MessageRejected, match="exactly client-id and tau"):
        wire.parse_description(decline, 2)
    assert wire.parse_receipt(from_records(to_records(wire.receipt(False, "why")))) == (False, "why")
    with pytest.raises(MessageRejected, match="status"):
        wire.parse_receipt(wire.Payload(config={"status": "maybe"}))
    m = wire.parse_metrics(from_records(to_records(wire.metrics(10, 0.1, 0.05, 0.4, 0.2))))
    assert m == {"shots": 10.0, "score-0shot": 0.1, "score-adapted": 0.05, "cold-score-0shot": 0.4,
                 "cold-score-adapted": 0.2}
    with pytest.raises(MessageRejected, match="finite number"):
        wire.parse_metrics(wire.Payload(metrics={**{k: 1.0 for k in wire.METRIC_KEYS}, "shots": float("inf")}))
    with pytest.raises(MessageRejected, match="exactly"):
        wire.parse_metrics(wire.Payload(metrics={"shots": 1}))


def test_initializer_round_trips_with_its_readout_prior_and_is_checked_on_the_device():
    from fedfuse.posterior import ReadoutGaussian

    class Post:  # what wire.initializer reads of a WeightPosterior
        mean = torch.randn(2, SPEC.num_weights)
        readout = ReadoutGaussian(torch.zeros(2, 5), torch.ones(2, 5, 3), torch.full((2, 5), 0.1))
        uncertainty, novelty = torch.tensor([0.1, 0.2]), torch.tensor([0.0, 0.9])
        distilled = True

    init = wire.parse_initializer(from_records(to_records(wire.initializer(Post, 1))), SPEC)
    assert torch.equal(init.weights, Post.mean[1]) and init.novelty == pytest.approx(0.9)
    assert init.distilled  # the flag crosses the wire
    older = wire.initializer(Post, 1)
    del older.config[wire.DISTILLED]  # an older server sends no flag
    assert not wire.parse_initializer(older, SPEC).distilled
    older.config[wire.DISTILLED] = "yes"
    with pytest.raises(MessageRejected, match="distilled must be true or false"):
        wire.parse_initializer(older, SPEC)
    assert torch.equal(init.readout.loc[0], Post.mean[1][SPEC.readout_index.flatten()])
    assert init.readout.factor.shape == (1, 5, 3)
    with pytest.raises(MessageRejected, match="has shape"):
        wire.parse_initializer(from_records(to_records(wire.initializer(Post, 0))), MLPSpec((1, 5, 1)))
    bad = wire.initializer(Post, 0)
    bad.arrays[wire.READOUT_DIAG] = -np.ones(5, dtype=np.float32)
    with pytest.raises(MessageRejected, match="negative"):
        wire.parse_initializer(bad, SPEC)
    vector = VectorSpec(13)  # 13 weights, but its readout is all of them: the factor must match
    with pytest.raises(MessageRejected, match="readout factor"):
        wire.parse_initializer(wire.initializer(Post, 0), vector)


scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                    st.text(max_size=20), st.binary(max_size=20))
values = st.one_of(scalars, st.lists(scalars, max_size=6), st.lists(st.integers(-3, 300), max_size=6))
meta_keys = st.sampled_from(sorted(wire.UPLOAD_KEYS) + ["data", "labels", "x"])
arrays = st.one_of(
    st.builds(lambda n, v: np.full(n, v, dtype=np.float32), st.integers(0, 40),
              st.floats(allow_nan=True, allow_infinity=True, width=32)),
    st.builds(lambda n: np.arange(n), st.integers(0, 30)),
    st.builds(lambda a, b: np.zeros((a, b)), st.integers(0, 5), st.integers(0, 5)),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(meta=st.dictionaries(meta_keys, values, max_size=8), weights=arrays)
def test_fuzzed_uploads_are_parsed_or_refused_with_a_reason(meta, weights):
    try:
        up = wire.parse_upload(wire.Payload({wire.FLAT: weights}, meta), SPEC, 2)
    except MessageRejected as exc:
        assert str(exc)  # a specific, non-empty reason
    else:
        assert np.isfinite(up.weights.numpy()).all() and up.weights.numel() == SPEC.num_weights


@settings(max_examples=300, deadline=None)
@given(change=st.dictionaries(st.sampled_from(sorted(wire.UPLOAD_KEYS)), values, min_size=1, max_size=3))
def test_fuzzed_single_fields_are_refused_or_taken_exactly_as_sent(change):
    try:
        up = wire.parse_upload(_with(config=change), SPEC, 2)
    except MessageRejected as exc:
        assert str(exc)
    else:  # accepted: every changed field was valid and is what the parser returns
        sent = {**GOOD.config, **change}
        assert up.client_id == sent["client-id"] and up.n_examples == sent["n-examples"]
        assert up.tau == [float(t) for t in sent["tau"]] and up.spec == SPEC


# -- whole Flower messages, as any sender could make them -----------------------------------------
PROPERTY = settings(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


def _initializer_content() -> RecordDict:
    p = SPEC.readout_index.numel()
    return to_records(wire.Payload(
        arrays={wire.FLAT: np.zeros(SPEC.num_weights, np.float32), wire.READOUT_FACTOR: np.ones((p, 3), np.float32),
                wire.READOUT_DIAG: np.full(p, 0.1, np.float32)},
        config={"uncertainty": 0.1, "novelty": 0.2}))


INITIALIZERS = st.builds(_initializer_content)
RECEIPTS = st.builds(lambda ok, why: to_records(wire.receipt(ok, why)), st.booleans(), st.text(max_size=20))


@settings(PROPERTY, max_examples=1500)
@given(data=st.data())
def test_any_initializer_message_is_taken_or_refused_with_a_reason(flower_messages, data):
    content = data.draw(flower_messages.contents(INITIALIZERS))
    try:
        init = wire.parse_initializer(from_records(content), SPEC)
    except MessageRejected as exc:
        assert str(exc).strip()
    else:
        assert init.weights.shape == (SPEC.num_weights,) and torch.isfinite(init.weights).all()


@settings(PROPERTY, max_examples=1000)
@given(data=st.data())
def test_any_receipt_message_is_taken_or_refused_with_a_reason(flower_messages, data):
    try:
        accepted, reason = wire.parse_receipt(from_records(data.draw(flower_messages.contents(RECEIPTS))))
    except MessageRejected as exc:
        assert str(exc).strip()
    else:
        assert isinstance(accepted, bool) and isinstance(reason, str)


@pytest.mark.parametrize("arch, reason", [
    ("[" * 2000 + "]" * 2000, "bad architecture"),  # deeper than the JSON parser's recursion
    (json.dumps({"kind": "module", "name": "small-cnn", "config": {"hidden": -3}}), "does not match"),
    (json.dumps({"kind": "module", "name": "small-cnn", "config": {"channels": [4096, 4096], "kernel": 64}}),
     "does not match"),  # never built: a 64 GB module
])
def test_an_architecture_the_federation_did_not_pin_is_refused_unbuilt(arch, reason):
    with pytest.raises(MessageRejected, match=reason):
        _parse(_with(config={"arch": arch}))


def test_an_npy_header_with_negative_dimensions_is_refused():
    content = to_records(GOOD)
    data = _npy_bytes((-1, -13), body=b"\0" * 52)
    content["arrays"] = ArrayRecord({wire.FLAT: Array(dtype="float32", shape=(13,), stype="numpy.ndarray", data=data)})
    with pytest.raises(MessageRejected, match="negative"):
        wire.parse_upload(from_records(content), SPEC, 2)


@pytest.mark.parametrize("value", [10**400, 1e300, -1e300, float("nan")])
def test_metrics_beyond_any_score_are_refused(value):
    metrics = {**dict(zip(wire.METRIC_KEYS, (10, 0.1, 0.1, 0.1, 0.1))), "score-adapted": value}
    with pytest.raises(MessageRejected, match="finite number within"):
        wire.parse_metrics(from_records(RecordDict({"metrics": MetricRecord(metrics)})))


def test_an_initializer_with_a_huge_integer_is_refused():
    content = _initializer_content()
    content["config"]["novelty"] = 10**400
    with pytest.raises(MessageRejected, match="uncertainty and novelty"):
        wire.parse_initializer(from_records(content), SPEC)
