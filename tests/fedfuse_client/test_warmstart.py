"""The device-side warm-start SDK against a scripted service (httpx's MockTransport) and an
unreachable one: checks, retries, refusals and the cold-start fallback. No Ray here; the SDK
against the real service is in tests/fedfuse_server/test_serve.py."""

import hashlib
import json
import math
import socket

import httpx
import pytest
import torch

from fedfuse import wire
from fedfuse.architectures import MLPSpec
from fedfuse.errors import MessageRejected
from fedfuse.io import dump_tensors, parse_tensors
from fedfuse.meta_model import MetaModel
from fedfuse.tasks import DeviceConfig, get_family, sine
from fedfuse.zoo import ModelZoo
from fedfuse_client.local import adapt, cold_start
from fedfuse_client.warmstart import ServiceRefused, ServiceUnavailable, fetch_initializer, warm_start

URL = "http://initializers.test"
VERSION = "ab" * 32
FAST = dict(retries=2, backoff=0.001, timeout=2.0)


@pytest.fixture(scope="module")
def family():
    return get_family("sine")


@pytest.fixture(scope="module")
def device(family):
    return family.simulated_device(30, DeviceConfig(num_clients=30, num_new=1, seed=0, shots=10))


@pytest.fixture(scope="module")
def body(device):
    """What the service sends this device: its initializer and 3 posterior samples (from a
    meta-model fitted in seconds on 20 briefly trained nets)."""
    torch.set_num_threads(1)  # module fixtures run before conftest's per-test setting
    tasks = sine.sample_tasks(20, seed=0)
    zoo = ModelZoo(sine.SPEC, sine.pretrain(tasks, seed=1, points=50, steps=100), tasks.tau,
                   [f"sine-{i}" for i in range(20)])
    model = MetaModel(hidden=(32,), max_rounds=2, steps_per_round=30, code_dim=4, base_dim=4, seed=0).fit(
        zoo, probe=torch.linspace(-5, 5, 32)[:, None])
    post = model.personalize(torch.tensor([device.tau]))
    samples = post.sample(torch.Size([3]), generator=torch.Generator().manual_seed(0))[:, 0]
    return wire.initializer_file(post, 0, version=VERSION, family="sine", samples=samples)


def _ok(data: bytes, checksum: str | None = None) -> httpx.Response:
    return httpx.Response(200, content=data, headers={
        wire.CHECKSUM_HEADER: checksum or hashlib.sha256(data).hexdigest(), wire.VERSION_HEADER: VERSION})


def _client(*answers):
    """A client whose service answers in turn (the last one repeats); records the requests."""
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        answer = answers[min(len(seen), len(answers)) - 1]
        if isinstance(answer, Exception):
            raise answer
        return answer

    return httpx.Client(transport=httpx.MockTransport(handle)), seen


def test_fetch_sends_the_descriptor_and_parses_what_comes_back(family, device, body):
    client, seen = _client(_ok(body))
    served = fetch_initializer(URL, device.client_id, device.tau, family.arch, token="s3cret", samples=3,
                               client=client, **FAST)
    assert len(seen) == 1 and seen[0].url.path == "/v1/initializers"
    assert seen[0].headers["authorization"] == "Bearer s3cret"
    assert json.loads(seen[0].content) == {"client_id": device.client_id, "descriptor": device.tau, "samples": 3}
    expected = wire.parse_initializer_file(body, family.arch)
    assert torch.equal(served.initializer.weights, expected.initializer.weights)
    assert served.initializer.readout is not None and served.samples.shape == (3, family.arch.num_weights)
    assert served.version == VERSION and served.family == "sine" and math.isfinite(served.initializer.uncertainty)
    client, seen = _client(_ok(body))
    fetch_initializer(URL, device.client_id, device.tau, family.arch, distill=True, client=client, **FAST)
    assert json.loads(seen[0].content) == {"client_id": device.client_id, "descriptor": device.tau, "distill": True}


def test_transient_failures_are_retried_with_backoff(family, device, body):
    client, seen = _client(httpx.ConnectError("refused"), httpx.Response(503, json={"error": "no fit yet"}), _ok(body))
    served = fetch_initializer(URL, device.client_id, device.tau, family.arch, client=client, **FAST)
    assert len(seen) == 3 and served.version == VERSION


def test_a_checksum_mismatch_is_refused(family, device, body):
    client, seen = _client(_ok(body, checksum="0" * 64))
    with pytest.raises(ServiceUnavailable, match="sha256 does not match"):
        fetch_initializer(URL, device.client_id, device.tau, family.arch, client=client, **FAST)
    assert len(seen) == FAST["retries"] + 1  # corrupted in transit: worth another try, never accepted
    client, _ = _client(_ok(body, checksum="0" * 64))
    warm = warm_start(URL, family, device, client=client, **FAST)
    assert warm.source == "cold-start" and "sha256" in warm.reason


def test_a_refusal_is_final_and_names_the_servers_reason(family, device):
    client, seen = _client(httpx.Response(400, json={"error": "descriptor outside the family's domain"}))
    with pytest.raises(ServiceRefused, match="HTTP 400.*outside the family's domain"):
        fetch_initializer(URL, device.client_id, device.tau, family.arch, client=client, **FAST)
    assert len(seen) == 1


def test_another_architecture_is_refused(device, body):
    client, seen = _client(_ok(body))
    with pytest.raises(MessageRejected, match=r"meta-model does not fit this device.*MLP \[1, 100, 1\]"):
        fetch_initializer(URL, device.client_id, device.tau, MLPSpec((1, 40, 1)), client=client, **FAST)
    assert len(seen) == 1


def test_a_body_from_another_model_than_its_header_is_refused(family, device, body):
    response = _ok(body)
    response.headers[wire.VERSION_HEADER] = "cd" * 32
    client, _ = _client(response)
    with pytest.raises(MessageRejected, match="the header says"):
        fetch_initializer(URL, device.client_id, device.tau, family.arch, client=client, **FAST)


def test_a_service_from_before_the_distilled_path_gives_the_fast_initializer(family, device, body):
    older = httpx.Response(400, json={"error": "unexpected keys ['distill']; a request carries only "
                                               "['client_id', 'descriptor', 'samples']"})
    client, seen = _client(older, _ok(body))
    served = fetch_initializer(URL, device.client_id, device.tau, family.arch, distill=True, client=client, **FAST)
    assert not served.initializer.distilled and len(seen) == 2
    assert json.loads(seen[0].content)["distill"] is True and "distill" not in json.loads(seen[1].content)
    other = httpx.Response(400, json={"error": "descriptor: amplitude 9 is outside the family's domain"})
    client, seen = _client(other, _ok(body))
    with pytest.raises(ServiceRefused, match="outside the family"):  # any other refusal stays final
        fetch_initializer(URL, device.client_id, device.tau, family.arch, distill=True, client=client, **FAST)
    assert len(seen) == 1


def test_warm_start_adapts_the_services_initializer_on_the_shots(family, device, body):
    client, _ = _client(_ok(body))
    warm = warm_start(URL, family, device, client=client, **FAST)
    served = wire.parse_initializer_file(body, family.arch)
    assert warm.source == "service" and warm.reason == "" and warm.version == VERSION
    assert torch.equal(warm.weights, adapt(family, served.initializer, device)[0])
    assert warm.uncertainty == served.initializer.uncertainty and not warm.distilled
    tensors, meta = parse_tensors(body, "test")
    distilled = dump_tensors(tensors, meta | {wire.DISTILLED: True})  # as the slower path's answer says
    client, _ = _client(_ok(distilled))
    assert warm_start(URL, family, device, client=client, **FAST).distilled


def test_an_unreachable_service_falls_back_to_a_cold_start_and_says_so(family, device):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    warm = warm_start(f"http://127.0.0.1:{port}", family, device, **FAST)
    assert warm.source == "cold-start" and math.isnan(warm.uncertainty) and warm.version is None
    assert "after 3 attempts" in warm.reason and "ConnectError" in warm.reason
    assert torch.equal(warm.weights, cold_start(family, device)[1][0])
