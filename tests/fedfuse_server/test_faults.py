"""Faults during collect: crashed, hanging and malformed devices are reported and skipped, and
the fit equals the one computed without them."""

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from flwr.simulation import run_simulation

from fedfuse import wire
from fedfuse.records import from_records
from fedfuse.runconfig import RunConfig
from fedfuse.screening import screen
from fedfuse.tasks import get_family
from fedfuse.zoo import ModelZoo
from fedfuse_client.client_app import build_client_app, upload_payload
from fedfuse_client.data import device_config
from fedfuse_server.phases import meta_model
from fedfuse_server.server_app import build_server_app
from fedfuse_server.store import ModelStore

CRASH, HANG, NAN = {1, 2}, {3}, {5}
SETTINGS = dict(num_clients=8, num_new=0, train_steps=300, fit_rounds=2, fit_steps=40,
                wait_for_nodes=60, round_timeout=20, parallel="serial", phase="collect,fit", quorum=0.5)


def faulty_mod(folder: str):
    def mod(msg, context, call_next):
        pid = int(context.node_config["partition-id"])
        action = msg.metadata.message_type
        if action == wire.UPLOAD and pid in CRASH:
            raise RuntimeError("device crashed mid-training")
        if action == wire.UPLOAD and pid in HANG:
            time.sleep(45)
        if action == wire.RECEIPT:
            accepted, reason = wire.parse_receipt(from_records(msg.content))
            Path(folder, f"receipt-{pid}.json").write_text(json.dumps([accepted, reason]))
        reply = call_next(msg, context)
        if action == wire.UPLOAD and pid in NAN:
            bad = np.full(301, np.nan, dtype=np.float32)
            reply.content["arrays"] = ArrayRecord({wire.FLAT: Array(bad)})
        return reply

    return mod


@pytest.mark.slow
def test_collect_survives_crashes_hangs_and_bad_uploads(tmp_path):
    store_dir, folder = tmp_path / "store", tmp_path / "receipts"
    folder.mkdir()
    settings = {**SETTINGS, "store": str(store_dir)}
    run_simulation(build_server_app(**settings), build_client_app(mods=[faulty_mod(str(folder))], **settings),
                   num_supernodes=8, backend_config={"client_resources": {"num_cpus": 1},
                                                     "init_args": {"address": "local", "num_cpus": 2}})
    store = ModelStore(store_dir)
    good = [p for p in range(8) if p not in CRASH | HANG | NAN]
    assert store.ids() == [f"sine-{p:05d}" for p in good]
    report = store.rounds("collect")[-1]
    assert len(report["failed"]) == 3
    assert any("crashed" in r for r in report["failed"].values())
    assert any("no reply within 20s" in r for r in report["failed"].values())
    assert len(report["rejected"]) == 1 and "NaN" in next(iter(report["rejected"].values()))
    receipts = {p.name: json.loads(p.read_text()) for p in folder.glob("*.json")}
    assert receipts["receipt-5.json"][0] is False and "NaN" in receipts["receipt-5.json"][1]
    assert receipts["receipt-0.json"] == [True, ""]

    # the fit equals one computed from the good devices alone, here in the test
    cfg = RunConfig(**{k: v for k, v in settings.items()})
    family = get_family(cfg.family)
    records = []
    for p in good:
        device = family.simulated_device(p, device_config(cfg))
        up = wire.parse_upload(upload_payload(family, device, cfg), family.arch, family.descriptor.length)
        records.append((up.client_id, up.weights, up.tau, up.n_examples))
    zoo = ModelZoo.from_models(family.arch, records)
    kept, _ = screen(zoo, family.probe(cfg.seed), threshold=cfg.screen)
    expected = meta_model(cfg, family).fit(kept, probe=family.probe(cfg.seed))
    fitted = store.load_meta_model()
    assert fitted.ids_ == expected.ids_
    tau = torch.tensor([[1.0, 0.3], [3.5, 2.0]])
    torch.testing.assert_close(fitted.personalize(tau).mean, expected.personalize(tau).mean)
