"""A client id is bound to the device (the node's authenticated key) that first uploaded it:
another device claiming it is refused with a receipt saying so, and of two devices claiming one
id in a round the first is kept."""

import json
from pathlib import Path

import pytest
import torch
from flwr.app import Message, RecordDict
from flwr.simulation import run_simulation

from fedfuse import wire
from fedfuse.records import from_records, to_records
from fedfuse.runconfig import RunConfig
from fedfuse.tasks import sine
from fedfuse_client.client_app import build_client_app
from fedfuse_server.phases import ServerRun
from fedfuse_server.server_app import build_server_app
from fedfuse_server.store import ModelStore


class Device:
    """A fake device: uploads ``cid`` with every weight ``value``; keeps its receipts."""

    def __init__(self, cid: str, value: float) -> None:
        self.cid, self.value, self.receipts = cid, value, []

    def __call__(self, msg: Message) -> Message:
        if msg.metadata.message_type == wire.RECEIPT:
            self.receipts.append(wire.parse_receipt(from_records(msg.content)))
            return Message(RecordDict(), reply_to=msg)
        weights = torch.full((sine.SPEC.num_weights,), self.value)
        return Message(to_records(wire.upload(self.cid, sine.SPEC, weights, [1.0, 1.0], 10)), reply_to=msg)


def _collect(grid, store, run: str = "1"):
    cfg = RunConfig(store=str(store), num_clients=len(grid.devices), num_new=0, wait_for_nodes=0, quorum=0.1,
                    phase="collect")
    return ServerRun(grid, cfg, run).collect()


def test_a_device_claiming_another_ones_id_is_refused(tmp_path, flower_task):
    owner, impostor = Device("dev-a", 1.0), Device("dev-a", 2.0)
    _collect(flower_task({11: owner}, {11: b"owner's key"}), tmp_path)
    # a later round: node ids change, keys do not; the impostor answers first
    report = _collect(flower_task({21: impostor, 22: Device("dev-a", 3.0)}, {21: b"impostor's key",
                                                                           22: b"owner's key"}), tmp_path)
    assert impostor.receipts == [(False, "client id 'dev-a' is bound to another device")]
    assert report.accepted == ["dev-a"] and "bound to another device" in report.rejected["node 21"]
    assert float(ModelStore(tmp_path).zoo().weights[0, 0]) == 3.0  # the owner's new upload


def test_of_two_devices_claiming_one_id_in_a_round_the_first_is_kept(tmp_path, flower_task):
    first, second = Device("twin", 1.0), Device("twin", 2.0)
    report = _collect(flower_task({11: first, 12: second}, {11: b"k1", 12: b"k2"}), tmp_path)
    assert first.receipts == [(True, "")]
    assert second.receipts == [(False, "client id 'twin' was already claimed by another device in this round")]
    assert report.accepted == ["twin"] and list(report.rejected) == ["node 12"]
    store = ModelStore(tmp_path)
    assert store.ids() == ["twin"] and float(store.zoo().weights[0, 0]) == 1.0
    assert len(list((tmp_path / "uploads").glob("*.safetensors"))) == 1


def test_without_a_key_a_device_is_its_node_id(tmp_path, flower_task):
    _collect(flower_task({11: Device("dev-a", 1.0)}), tmp_path)
    assert ModelStore(tmp_path).bindings() == {"dev-a": "node:11"}


# -- in Flower's simulation ---------------------------------------------------------------------
SETTINGS = dict(num_clients=6, num_new=0, train_steps=50, wait_for_nodes=60, round_timeout=120,
                parallel="serial", phase="collect,collect", quorum=0.5)
TWINS = {2, 3}  # both claim "twin" in both rounds
IMPOSTOR = 1  # claims device 0's id in the second round


def claiming_mod(folder: str):
    """Rewrites client ids as above; writes down every receipt, by device and round."""

    def mod(msg, context, call_next):
        pid = int(context.node_config["partition-id"])
        count = Path(folder, f"uploads-{pid}")
        rounds = int(count.read_text()) if count.exists() else 0
        if msg.metadata.message_type == wire.RECEIPT:
            receipt = wire.parse_receipt(from_records(msg.content))
            Path(folder, f"receipt-{pid}-{rounds}.json").write_text(json.dumps(receipt))
        reply = call_next(msg, context)
        if msg.metadata.message_type == wire.UPLOAD:
            count.write_text(str(rounds + 1))
            if pid in TWINS:
                reply.content["config"]["client-id"] = "twin"
            elif pid == IMPOSTOR and rounds == 1:
                reply.content["config"]["client-id"] = "sine-00000"
        return reply

    return mod


@pytest.mark.slow
def test_in_simulation_an_impostor_and_a_duplicate_id_are_refused(tmp_path):
    store_dir, folder = tmp_path / "store", tmp_path / "receipts"
    folder.mkdir()
    settings = {**SETTINGS, "store": str(store_dir)}
    run_simulation(build_server_app(**settings), build_client_app(mods=[claiming_mod(str(folder))], **settings),
                   num_supernodes=6, backend_config={"client_resources": {"num_cpus": 1},
                                                     "init_args": {"address": "local", "num_cpus": 2}})
    receipts = {p.stem: tuple(json.loads(p.read_text())) for p in folder.glob("receipt-*.json")}
    assert receipts["receipt-1-2"] == (False, "client id 'sine-00000' is bound to another device")
    assert receipts["receipt-0-2"] == (True, "")
    twins = sorted((receipts[f"receipt-{p}-1"], receipts[f"receipt-{p}-2"]) for p in TWINS)
    assert twins == [((False, "client id 'twin' was already claimed by another device in this round"),
                      (False, "client id 'twin' is bound to another device")), ((True, ""), (True, ""))]
    store = ModelStore(store_dir)
    assert store.ids() == ["sine-00000", "sine-00001", "sine-00004", "sine-00005", "twin"]
    assert [len(r["accepted"]) for r in store.rounds("collect")] == [5, 4]
