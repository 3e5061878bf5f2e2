"""Malformed uploads: every one is refused with a specific reason, none crashes the parser."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedfuse import wire
from fedfuse.layout import MLPSpec

SPEC = MLPSpec((1, 4, 1))
GOOD = wire.upload_meta("dev-1", SPEC, [0.5, 1.0], 20)


class FakeArray:
    """What Flower's Array exposes to the parser: raw bytes, and numpy() to decode them."""

    def __init__(self, arr: np.ndarray) -> None:
        self._arr, self.data = arr, arr.tobytes()

    def numpy(self) -> np.ndarray:
        return self._arr


def _good_weights() -> np.ndarray:
    return np.zeros(SPEC.num_weights, dtype=np.float32)


def test_a_good_upload_parses():
    up = wire.parse_upload(dict(GOOD), _good_weights())
    assert up.client_id == "dev-1" and up.spec == SPEC and up.tau == [0.5, 1.0] and up.n_examples == 20


@pytest.mark.parametrize("change, reason", [
    ({"extra": 1}, "unexpected metadata keys \\['extra'\\]"),
    ({"client-id": ""}, "client-id must be a printable string"),
    ({"client-id": "x" * 500}, "client-id must be a printable string"),
    ({"arch-sizes": [1, "a", 1]}, "arch-sizes must be a list of integers"),
    ({"arch-sizes": [1, 0, 1]}, "bad architecture"),
    ({"arch-sizes": [1] * 40}, "outside the accepted range"),
    ({"arch-sizes": [1, 5, 1]}, "weights have shape \\(13,\\); architecture \\[1, 5, 1\\] needs a flat vector of 16"),
    ({"activation": "swish"}, "unknown activation"),
    ({"tau": []}, "tau must be a non-empty list"),
    ({"tau": [1.0, float("nan")]}, "tau has non-finite entries"),
    ({"tau": [10**400]}, "too large to represent"),
    ({"tau": ["a"]}, "tau must be a non-empty list of numbers"),
    ({"n-examples": -1}, "n-examples must be a non-negative integer"),
    ({"n-examples": True}, "n-examples must be a non-negative integer"),
])
def test_each_bad_metadata_gets_its_own_reason(change, reason):
    with pytest.raises(wire.UploadRejected, match=reason):
        wire.parse_upload({**GOOD, **change}, _good_weights())


@pytest.mark.parametrize("weights, reason", [
    (np.full(SPEC.num_weights, np.nan, dtype=np.float32), "NaN or infinite"),
    (np.full(SPEC.num_weights, 1e6, dtype=np.float32), "absurd weight magnitude"),
    (np.zeros(SPEC.num_weights, dtype=np.int64), "floating-point"),
    (np.zeros((SPEC.num_weights, 1), dtype=np.float32), "flat vector"),
])
def test_each_bad_weight_array_gets_its_own_reason(weights, reason):
    with pytest.raises(wire.UploadRejected, match=reason):
        wire.parse_upload(dict(GOOD), weights)


def test_pinned_architecture_and_descriptor_length():
    with pytest.raises(wire.UploadRejected, match="does not match the federation's"):
        wire.parse_upload(dict(GOOD), _good_weights(), expected=MLPSpec((1, 5, 1)))
    with pytest.raises(wire.UploadRejected, match="descriptors have length 3"):
        wire.parse_upload(dict(GOOD), _good_weights(), tau_dim=3)


def test_message_level_checks():
    good = {wire.WEIGHTS: {wire.FLAT: FakeArray(_good_weights())}, wire.META: dict(GOOD)}
    assert wire.parse_upload_content(good).client_id == "dev-1"
    with pytest.raises(wire.UploadRejected, match="unexpected records"):
        wire.parse_upload_content({**good, "data": {}})
    with pytest.raises(wire.UploadRejected, match="exactly one array"):
        wire.parse_upload_content({**good, wire.WEIGHTS: {wire.FLAT: good[wire.WEIGHTS][wire.FLAT], "x": 1}})
    with pytest.raises(wire.UploadRejected, match="needs a weights record"):
        wire.parse_upload_content({wire.META: dict(GOOD)})

    class Huge(FakeArray):
        data = b"\x00" * (8 * wire.MAX_WEIGHTS + 5000)

    huge = Huge(_good_weights())
    huge.data = Huge.data
    with pytest.raises(wire.UploadRejected, match="oversized upload"):
        wire.parse_upload_content({**good, wire.WEIGHTS: {wire.FLAT: huge}})


scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                    st.text(max_size=20), st.binary(max_size=20))
values = st.one_of(scalars, st.lists(scalars, max_size=6), st.lists(st.integers(-3, 300), max_size=6))
meta_keys = st.sampled_from(sorted(wire.UPLOAD_META_KEYS) + ["data", "labels", "x"])
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
        up = wire.parse_upload(meta, weights)
    except wire.UploadRejected as exc:
        assert str(exc)  # a specific, non-empty reason
    else:
        assert np.isfinite(up.weights.numpy()).all() and up.weights.numel() == up.spec.num_weights


@settings(max_examples=300, deadline=None)
@given(change=st.dictionaries(st.sampled_from(sorted(wire.UPLOAD_META_KEYS)), values, min_size=1, max_size=3))
def test_fuzzed_single_fields_of_a_good_upload(change):
    try:
        wire.parse_upload({**GOOD, **change}, _good_weights())
    except wire.UploadRejected as exc:
        assert str(exc)
