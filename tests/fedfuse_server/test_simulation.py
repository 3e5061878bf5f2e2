"""End to end with Flower's real simulation engine: collect, fit, personalize."""

import json
import uuid
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.simulation import run_simulation

from fedfuse import wire
from fedfuse_client.client_app import build_client_app
from fedfuse_server.server_app import build_server_app
from fedfuse_server.store import ModelStore

NUM_CLIENTS, NUM_NEW = 10, 4
SETTINGS = dict(num_clients=NUM_CLIENTS, num_new=NUM_NEW, train_steps=400, fit_rounds=4,
                fit_steps=100, finetune_steps=300, wait_for_nodes=60, parallel="ray")


def recording_mod(folder: str):
    """Write down every reply a device sends: record names, types, keys, shapes, value types."""

    def mod(msg, context, call_next):
        reply = call_next(msg, context)
        entry = {"type": msg.metadata.message_type, "records": {}}
        for name, rec in reply.content.items():
            if isinstance(rec, ArrayRecord):
                desc = {"kind": "array", "arrays": {k: list(a.shape) for k, a in rec.items()}}
            elif isinstance(rec, ConfigRecord):
                desc = {"kind": "config", "values": {k: type(v).__name__ + (f"[{len(v)}]" if isinstance(v, (list, bytes, str)) else "")
                                                     for k, v in rec.items()}}
            elif isinstance(rec, MetricRecord):
                desc = {"kind": "metric", "values": {k: type(v).__name__ for k, v in rec.items()}}
            else:
                desc = {"kind": type(rec).__name__}
            entry["records"][name] = desc
        Path(folder, f"{uuid.uuid4().hex}.json").write_text(json.dumps(entry))
        return reply

    return mod


def _simulate(store: Path, log_dir: Path, **overrides):
    settings = {**SETTINGS, "store": str(store), **overrides}
    run_simulation(
        build_server_app(**settings),
        build_client_app(mods=[recording_mod(str(log_dir))], **settings),
        num_supernodes=NUM_CLIENTS + NUM_NEW,
        backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"address": "local", "num_cpus": 2}},
    )


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    root = tmp_path_factory.mktemp("sim")
    store, log_dir = root / "store", root / "messages"
    log_dir.mkdir()
    _simulate(store, log_dir)
    return store, log_dir


@pytest.mark.slow
def test_personalized_devices_beat_cold_start(simulated):
    store = ModelStore(simulated[0])
    assert len(store.ids()) == NUM_CLIENTS
    metrics = store.metrics()
    assert sorted(metrics) == [f"new-{j:05d}" for j in range(NUM_NEW)]
    mean = lambda key: sum(m[key] for m in metrics.values()) / len(metrics)  # noqa: E731
    assert mean("score-0shot") < mean("cold-score-0shot")
    assert mean("score-adapted") < mean("cold-score-adapted")


@pytest.mark.slow
def test_every_client_message_carries_only_weights_metadata_and_metrics(simulated):
    entries = [json.loads(p.read_text()) for p in simulated[1].glob("*.json")]
    kinds = {"upload": 0, "declined": 0, "query": 0, "metrics": 0, "receipt-ack": 0}
    for e in entries:
        recs, kind = e["records"], e["type"]
        if kind == wire.RECEIPT:  # acknowledging the server's receipt for an upload
            assert recs == {}
            kinds["receipt-ack"] += 1
        elif kind == wire.UPLOAD and "arrays" in recs:  # an upload
            assert recs["arrays"] == {"kind": "array", "arrays": {wire.FLAT: [301]}}
            values = recs["config"]["values"]
            assert set(values) == wire.UPLOAD_KEYS and set(recs) == {"arrays", "config"}
            assert values["tau"] == "list[2]" and values["n-examples"] == "int" and values["arch"].startswith("str")
            kinds["upload"] += 1
        elif kind == wire.UPLOAD:  # a new device has no model to share
            assert set(recs) == {"config"} and set(recs["config"]["values"]) == {"client-id", wire.STATUS}
            kinds["declined"] += 1
        elif kind == wire.DESCRIBE:
            assert set(recs) == {"config"} and set(recs["config"]["values"]) == {"client-id", "tau"}
            kinds["query"] += 1
        else:
            assert kind == wire.PERSONALIZE and set(recs) == {"metrics"}
            assert recs["metrics"]["kind"] == "metric"
            assert set(recs["metrics"]["values"]) == set(wire.METRIC_KEYS)
            kinds["metrics"] += 1
    assert kinds == {"upload": NUM_CLIENTS, "declined": NUM_NEW, "query": NUM_CLIENTS + NUM_NEW,
                     "metrics": NUM_NEW, "receipt-ack": NUM_CLIENTS}


@pytest.mark.slow
def test_a_second_run_finds_the_store_and_personalizes_again(simulated, tmp_path):
    store_dir, _ = simulated
    log_dir = tmp_path / "msgs"
    log_dir.mkdir()
    before = ModelStore(store_dir).metrics()
    _simulate(store_dir, log_dir, phase="personalize")
    after = ModelStore(store_dir).metrics()
    assert len(after) == len(before) and len(ModelStore(store_dir).ids()) == NUM_CLIENTS
    # only queries and fine-tuning this time: nothing was uploaded again
    recs = [json.loads(p.read_text())["records"] for p in log_dir.glob("*.json")]
    assert not any("arrays" in r for r in recs)
