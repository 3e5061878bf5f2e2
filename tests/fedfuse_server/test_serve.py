"""The initializer service for real: Ray Serve on 127.0.0.1 over a tiny fitted sine store, one
service for the module (further apps on the same Serve where a test needs another store or a
token). HTTP, every error code, the hot swap, the SDK and the simulated device against it, and the
personal-assistant story on MovieLens. The CLI's wiring is checked without Ray."""

import asyncio
import copy
import gc
import hashlib
import importlib.util
import json
import socket
import sys
import threading
import time
import weakref
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import httpx
import pytest
import torch
from typer.testing import CliRunner

from fedfuse import wire
from fedfuse.meta_model import MetaModel
from fedfuse.runconfig import RunConfig
from fedfuse.tasks import DeviceConfig, get_family, sine
from fedfuse.zoo import ModelZoo
from fedfuse_client.client_app import initializer_for, metrics_payload
from fedfuse_client.warmstart import warm_start
from fedfuse_server import serve as service_module
from fedfuse_server.store import ModelStore

ROOT = Path(__file__).parents[2]
TAU = [1.5, 0.8]
NEW_DEVICE = DeviceConfig(num_clients=20, num_new=1, seed=0, shots=10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def models() -> list[MetaModel]:
    """Two meta-models of one sine zoo (seeds 0 and 1: two versions), fitted in seconds."""
    torch.set_num_threads(1)  # module fixtures run before conftest's per-test setting
    tasks = sine.sample_tasks(20, seed=0)
    zoo = ModelZoo(sine.SPEC, sine.pretrain(tasks, seed=1, points=50, steps=100), tasks.tau,
                   [f"sine-{i:05d}" for i in range(20)])
    out = []
    for seed in (0, 1):
        model = MetaModel(hidden=(32,), max_rounds=2, steps_per_round=30, code_dim=4, base_dim=4, seed=seed)
        model.fit(zoo, probe=torch.linspace(-5, 5, 32)[:, None])
        model.annotations_ = {"family": "sine", "descriptor": ["amplitude", "phase"]}  # sine.SPEC: the family's
        out.append(model)
    return out


@pytest.fixture(scope="module")
def service(tmp_path_factory, models) -> Iterator[SimpleNamespace]:
    store = ModelStore(tmp_path_factory.mktemp("store"))
    store.save_meta_model(models[0])
    with service_module.serving(store.root, port=_free_port(), poll_s=0.2) as url:
        yield SimpleNamespace(url=url, store=store, http=httpx.Client(base_url=url, timeout=30))


@contextmanager
def another_app(service: SimpleNamespace, name: str, **args: object) -> Iterator[str]:
    """One more app on the module's Serve, at /<name>, removed afterwards."""
    from ray import serve

    serve.run(service_module.build_app({"poll_s": 0.2, **args}), name=name, route_prefix=f"/{name}")
    try:
        yield f"/{name}"
    finally:
        serve.delete(name)


def _post(http: httpx.Client, body: object, prefix: str = "", **kwargs) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http.post(f"{prefix}/v1/initializers", content=content, **kwargs)


@pytest.mark.slow
def test_the_initializer_is_the_stored_models_and_says_which(service):
    resp = _post(service.http, {"client_id": "phone-1", "descriptor": TAU})
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/octet-stream"
    assert resp.headers[wire.CHECKSUM_HEADER] == hashlib.sha256(resp.content).hexdigest()
    entry = service.store.meta_model_entry()
    assert resp.headers[wire.VERSION_HEADER] == entry.sha256
    served = wire.parse_initializer_file(resp.content, sine.SPEC)
    post = service.store.load_meta_model().personalize(TAU)
    assert torch.equal(served.initializer.weights, post.mean[0])
    assert served.initializer.readout is not None and served.samples is None
    assert (served.version, served.family, served.low_confidence) == (entry.sha256, "sine", False)
    assert served.initializer.novelty == pytest.approx(float(post.novelty[0]))


@pytest.mark.slow
def test_concurrent_requests_are_batched_without_mixing_devices(service):
    """Requests arriving together share one ``personalize`` call; each device still gets the
    initializer of its own descriptor."""
    taus = [[0.5 + 0.18 * i, 0.13 * i] for i in range(24)]  # inside the sine domain

    async def ask_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=service.url, timeout=30) as http:
            return await asyncio.gather(*(http.post("/v1/initializers", content=json.dumps(
                {"client_id": f"phone-{i}", "descriptor": t}).encode()) for i, t in enumerate(taus)))

    responses = asyncio.run(ask_all())
    assert [r.status_code for r in responses] == [200] * len(taus)
    want = service.store.load_meta_model().personalize(taus).mean
    got = torch.stack([wire.parse_initializer_file(r.content, sine.SPEC).initializer.weights for r in responses])
    # each device's own function: a batch of another size rounds the single-precision features
    # differently, which the small readout ridge carries into the weights (about 1e-5 of a
    # weight's size) but not into what the network computes; another device's would be far off
    grid = torch.linspace(-5, 5, 101)[:, None]
    torch.testing.assert_close(sine.SPEC.forward(got, grid), sine.SPEC.forward(want, grid), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
    assert (sine.SPEC.forward(got.roll(1, 0), grid) - sine.SPEC.forward(want, grid)).abs().amax((1, 2)).min() > 1e-2


@pytest.mark.slow
def test_posterior_samples_are_bounded_and_reproducible(service):
    first, again = (_post(service.http, {"client_id": "phone-1", "descriptor": TAU, "samples": 4}) for _ in range(2))
    samples = wire.parse_initializer_file(first.content, sine.SPEC).samples
    assert samples.shape == (4, sine.SPEC.num_weights) and len({tuple(s.tolist()) for s in samples}) == 4
    assert torch.equal(samples, wire.parse_initializer_file(again.content, sine.SPEC).samples)
    too_many = _post(service.http, {"client_id": "phone-1", "descriptor": TAU, "samples": wire.MAX_SAMPLES + 1})
    assert too_many.status_code == 400 and "samples must be an integer from 0 to 64" in too_many.json()["error"]


@pytest.mark.slow
def test_model_info_and_health(service):
    info = service.http.get("/v1/model").json()
    entry = service.store.meta_model_entry()
    assert info["family"] == "sine" and info["architecture"] == sine.SPEC.to_dict()
    assert info["descriptor"] == {"length": 2, "names": ["amplitude", "phase"]}
    assert (info["version"], info["n_models"]) == (entry.sha256, 20) and info["fitted_at"].endswith("+00:00")
    assert info["distill_steps"] == service.store.load_meta_model().distill_steps_
    assert service.http.get("/healthz").json() == {"status": "ok", "version": entry.sha256}
    assert service.http.get("/v2/initializers").status_code == 404
    assert service.http.post("/healthz").status_code == 405
    wrong = service.http.get("/v1/initializers")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST" and "error" in wrong.json()


@pytest.mark.slow
@pytest.mark.parametrize("body, reason", [
    (b"{not json", "not JSON"),
    (b"[1.5, 0.8]", "a JSON object"),
    ({"client_id": "phone-1", "descriptor": [1.5]}, "tau has length 1; this federation's descriptors have length 2"),
    ({"client_id": "phone-1", "descriptor": "1.5,0.8"}, "tau must be a non-empty list of numbers"),
    ({"client_id": "phone-1", "descriptor": [9.0, 0.8]}, "outside the family's domain: amplitude=9"),
    ({"client_id": "phone-1", "descriptor": [1e300, 0.8]}, "non-finite entries or entries beyond"),
    ({"client_id": "", "descriptor": TAU}, "client-id must be a printable string"),
    ({"client_id": "phone\n1", "descriptor": TAU}, "client-id must be a printable string"),
    ({"descriptor": TAU}, "client-id must be a printable string"),
    ({"client_id": "phone-1", "descriptor": TAU, "data": [1, 2]}, "unexpected keys ['data']"),
    ({"client_id": "phone-1", "descriptor": TAU, "distill": "yes"}, "distill must be true or false"),
    (b"[" * 150_000 + b"]" * 150_000, "exceeds 262144 bytes"),
], ids=["bad-json", "not-an-object", "short", "string", "out-of-domain", "huge", "empty-id", "control-char",
        "no-id", "extra-key", "distill-not-bool", "oversized"])
def test_bad_requests_get_400_and_the_reason(service, body, reason):
    resp = _post(service.http, body)
    assert resp.status_code == 400 and reason in resp.json()["error"]


@pytest.mark.slow
def test_a_token_file_requires_the_bearer_token(service, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    with another_app(service, "secured", store=str(service.store.root), token_file=str(token)) as prefix:
        body = {"client_id": "phone-1", "descriptor": TAU}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret-token"}):
            resp = _post(service.http, body, prefix, headers=headers)
            assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer"
            assert "bearer token" in resp.json()["error"]
        assert service.http.get(f"{prefix}/v1/model").status_code == 401
        assert _post(service.http, body, prefix, headers={"Authorization": "Bearer s3cret-token"}).status_code == 200
        assert service.http.get(f"{prefix}/healthz").status_code == 200  # probes need no token


@pytest.mark.slow
def test_503_until_the_first_fit_lands_then_it_is_served(service, tmp_path, models):
    with another_app(service, "fresh", store=str(tmp_path)) as prefix:
        body = {"client_id": "phone-1", "descriptor": TAU}
        resp = _post(service.http, body, prefix)
        assert resp.status_code == 503 and "no meta-model has been fitted yet" in resp.json()["error"]
        assert service.http.get(f"{prefix}/v1/model").status_code == 503
        assert service.http.get(f"{prefix}/healthz").json() == {"status": "ok", "version": None}
        ModelStore(tmp_path).save_meta_model(models[1])
        deadline = time.monotonic() + 30
        while resp.status_code == 503 and time.monotonic() < deadline:
            time.sleep(0.1)
            resp = _post(service.http, body, prefix)
        assert resp.status_code == 200
        assert resp.headers[wire.VERSION_HEADER] == ModelStore(tmp_path).meta_model_entry().sha256


@pytest.mark.slow
def test_a_distilled_initializer_is_the_slower_path_of_the_stored_model(service, tmp_path, models):
    model = copy.copy(models[0])
    model.distill_steps_ = 50  # whatever this small zoo chose, the path must train
    ModelStore(tmp_path).save_meta_model(model)
    distilled = model.personalize(TAU, distill=True).mean[0]
    assert not torch.equal(distilled, model.personalize(TAU).mean[0])
    with another_app(service, "distilled", store=str(tmp_path)) as prefix:
        body = {"client_id": "phone-1", "descriptor": TAU, "distill": True}
        resp, deadline = _post(service.http, body, prefix), time.monotonic() + 30
        while resp.status_code == 503 and time.monotonic() < deadline:
            time.sleep(0.1)
            resp = _post(service.http, body, prefix)
        assert resp.status_code == 200 and service.http.get(f"{prefix}/v1/model").json()["distill_steps"] == 50
        served = wire.parse_initializer_file(resp.content, sine.SPEC).initializer
        assert torch.equal(served.weights, distilled) and served.distilled  # the header says so
        fast = _post(service.http, {"client_id": "phone-1", "descriptor": TAU}, prefix)
        served = wire.parse_initializer_file(fast.content, sine.SPEC).initializer
        assert torch.equal(served.weights, model.personalize(TAU).mean[0]) and not served.distilled


def test_a_replica_computes_at_most_max_distilling_distilled_initializers_at_once(tmp_path, models):
    """Beyond ``MAX_DISTILLING`` optimizer loops a replica answers "ask again" instead of slowing
    every request down; a freed slot serves the next one (the plain class, no Ray)."""
    store = ModelStore(tmp_path / "store")
    store.save_meta_model(models[0])
    interval = sys.getswitchinterval()
    replica = service_module.InitializerService(str(store.root), poll_s=60)
    try:
        served = replica._served
        for _ in range(service_module.MAX_DISTILLING):
            assert replica._distill_slots.acquire(blocking=False)
        assert asyncio.run(replica._distilled(served, "phone-1", TAU, 0)) is None
        replica._distill_slots.release()
        data = asyncio.run(replica._distilled(served, "phone-1", TAU, 0))
        assert data == served.initializer("phone-1", TAU, 0, distill=True)
        assert replica._distill_slots.acquire(blocking=False)  # the slot it used is free again
    finally:
        replica._stop.set()
        gc.unfreeze()
        sys.setswitchinterval(interval)


@pytest.mark.slow
def test_the_sdk_and_a_simulated_device_fetch_from_the_service(service):
    family = get_family("sine")
    device = family.simulated_device(20, NEW_DEVICE)
    warm = warm_start(service.url, family, device, retries=1, backoff=0.01)
    assert warm.source == "service" and warm.version == service.store.meta_model_entry().sha256
    cfg = RunConfig(num_clients=20, num_new=1, initializer_url=service.url, finetune_steps=50)
    init = initializer_for(family, device, cfg, wire.Payload())  # the Flower message's is ignored
    assert torch.equal(init.weights, service.store.load_meta_model().personalize(device.tau).mean[0])
    assert set(metrics_payload(family, init, device, cfg).metrics) == set(wire.METRIC_KEYS)


@pytest.mark.slow
def test_the_assistant_story_warm_starts_new_users_better_than_cold(service, tmp_path):
    spec = importlib.util.spec_from_file_location("assistant", ROOT / "simulations" / "examples" / "assistant.py")
    assistant = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(assistant)
    assistant.build_store(tmp_path, users=40, new=3, fit_rounds=1, fit_steps=50)
    family = get_family("movielens")
    with another_app(service, "assistant", store=str(tmp_path)) as prefix:
        phones = [assistant.phone(service.url + prefix, family, family.simulated_device(j, DeviceConfig(0, 3, 0, 10)))
                  for j in range(3)]
    assert all(p["source"] == "service" for p in phones), phones
    assert sum(p["rmse_warm"] for p in phones) < sum(p["rmse_cold"] for p in phones), phones


def test_a_replica_keeps_its_model_out_of_gc_scans_and_still_frees_a_swapped_out_one(tmp_path, models):
    """A replica (the plain class, no Ray) freezes what is alive once a model is served, so a
    full collection does not scan Ray's, torch's and the model's objects; the model a new fit
    replaces is still freed, by reference counting alone."""
    store = ModelStore(tmp_path / "store")
    store.save_meta_model(models[0])
    gc.unfreeze()
    interval = sys.getswitchinterval()
    replica = service_module.InitializerService(str(store.root), poll_s=0.05)
    try:
        assert gc.get_freeze_count() > 0
        # and its poller, loading a new fit, hands the interpreter back to requests within 1 ms
        assert sys.getswitchinterval() == service_module.SWITCH_INTERVAL_S <= 0.001 < interval
        first, old = replica._served.entry.sha256, weakref.ref(replica._served.model)
        store.save_meta_model(models[1])
        deadline = time.monotonic() + 30
        while replica._served.entry.sha256 == first and time.monotonic() < deadline:
            time.sleep(0.05)
        assert replica._served.entry.sha256 != first
        assert old() is None
    finally:
        replica._stop.set()
        gc.unfreeze()
        sys.setswitchinterval(interval)


def test_a_fit_that_cannot_answer_is_not_swapped_in(service, models):
    served = service.store.meta_model_entry().sha256
    broken = copy.deepcopy(models[1])
    broken.function_.nearby_size_, broken.function_.nearby_shrink_ = 4, -1.0  # damaged: no covariance
    bad = hashlib.sha256(service.store.save_meta_model(broken).read_bytes()).hexdigest()
    try:
        time.sleep(1.0)  # five polls
        resp = _post(service.http, {"client_id": "phone-1", "descriptor": TAU})
        assert resp.status_code == 200 and resp.headers[wire.VERSION_HEADER] == served != bad
        assert service.http.get("/healthz").json()["version"] == served
    finally:
        service.store.save_meta_model(models[0])


@pytest.mark.slow
def test_a_new_fit_is_swapped_in_without_failing_a_request(service, models):
    """Runs last in the module: it leaves the second model in the store."""
    old = service.store.meta_model_entry().sha256
    versions, failures, stop = [], [], threading.Event()

    def load() -> None:
        with httpx.Client(base_url=service.url, timeout=30) as http:
            while not stop.is_set():
                try:
                    resp = _post(http, {"client_id": "phone-1", "descriptor": TAU})
                    if resp.status_code != 200:
                        failures.append(resp.status_code)
                    else:
                        versions.append(resp.headers[wire.VERSION_HEADER])
                        assert wire.parse_initializer_file(resp.content, sine.SPEC).version == versions[-1]
                except Exception as exc:  # noqa: BLE001 - every kind of failure counts
                    failures.append(repr(exc))

    worker = threading.Thread(target=load)
    worker.start()
    try:
        time.sleep(1.0)
        new = hashlib.sha256(service.store.save_meta_model(models[1]).read_bytes()).hexdigest()
        deadline = time.monotonic() + 30
        while new not in versions and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
    finally:
        stop.set()
        worker.join()
    assert failures == [] and len(versions) >= 10
    assert versions[0] == old and versions[-1] == new and set(versions) == {old, new}
    assert all(v == new for v in versions[versions.index(new):])  # never back to the old one


def test_the_serve_command_passes_its_options_and_refuses_a_missing_store(tmp_path, monkeypatch):
    from fedfuse_sim.cli import app

    calls = []
    monkeypatch.setattr(service_module, "serve_until_stopped",
                        lambda store, on_ready, **options: (calls.append((store, options)), on_ready("http://x:1")))
    ModelStore(tmp_path / "store")
    result = CliRunner().invoke(app, ["serve", "--store", str(tmp_path / "store"), "--host", "0.0.0.0", "--port",
                                      "9000", "--replicas", "2", "--token-file", str(tmp_path / "token"),
                                      "--no-access-log"])
    assert result.exit_code == 0, result.output
    assert "serving initializers at http://x:1" in result.output and "stopped" in result.output
    assert calls == [(tmp_path / "store", {"host": "0.0.0.0", "port": 9000, "replicas": 2,
                                           "token_file": tmp_path / "token", "access_log": False})]
    result = CliRunner().invoke(app, ["serve", "--store", str(tmp_path / "nowhere")])
    assert result.exit_code == 1 and "holds no model store" in result.output


def test_the_access_log_switch_reaches_the_deployment_and_refuses_non_booleans(tmp_path):
    def logging_config(app) -> dict | None:  # what Serve deploys (a private attribute of Ray 2.55)
        return app._bound_deployment._deployment_config.logging_config

    # on by default, and then the application-level logging config (serveConfigV2) still applies
    assert logging_config(service_module.build_app({"store": str(tmp_path)})) is None
    assert logging_config(service_module.build_app({"store": str(tmp_path), "access_log": True})) is None
    assert logging_config(service_module.build_app({"store": str(tmp_path), "access_log": False}))["enable_access_log"] is False
    with pytest.raises(service_module.FedfuseError, match="access_log must be true or false"):
        service_module.build_app({"store": str(tmp_path), "access_log": "no"})
