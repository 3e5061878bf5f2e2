"""Real processes on 127.0.0.1: a TLS SuperLink with SuperNode authentication and SuperNodes."""

from pathlib import Path

import pytest
import torch

from fedfuse.tasks import DeviceConfig, get_family
from fedfuse_deploy.credentials import make_certificates
from fedfuse_deploy.launcher import LocalDeployment, port_open
from fedfuse_server.store import ModelStore

APP = Path(__file__).parents[2]
SMALL = "num-clients=3 train-steps=300 fit-rounds=3 fit-steps=60 wait-for-nodes=60 parallel='serial'"


def _devices(folder: Path) -> list[Path]:
    family, cfg = get_family("sine"), DeviceConfig(num_clients=3, num_new=1, seed=0, shots=10)
    paths = []
    for p in range(4):
        path = folder / f"device{p}.safetensors"
        family.simulated_device(p, cfg).save(path, family.name)
        paths.append(path)
    return paths


@pytest.mark.slow
def test_tls_deployment_collect_restart_refuse_an_impostor_fit_and_personalize_a_late_node(tmp_path):
    dep = LocalDeployment(tmp_path / "deploy")
    data = _devices(tmp_path)
    store = tmp_path / "store"
    ports = []
    try:
        dep.start_superlink()
        for p in range(3):
            dep.add_supernode(f"sine-{p:05d}", data[p])
        ports = [dep.superlink.port] + [n.port for n in dep.supernodes.values()]
        out = dep.run(APP, f"phase='collect' store='{store}' num-new=0 {SMALL}")
        assert "Successfully started run" in out
        assert ModelStore(store).ids() == ["sine-00000", "sine-00001", "sine-00002"]

        owners = ModelStore(store).bindings()
        first = ModelStore(store).zoo().weights
        assert len(set(owners.values())) == 3 and all(v.startswith("key:") for v in owners.values())

        # the server dies hard between collect and fit; after a restart a registered node claims
        # device 0's id: refused, while the devices' own re-uploads are taken; the fit finds every upload
        dep.kill_superlink()
        assert not port_open(dep.host, dep.superlink.port)
        dep.start_superlink()
        dep.add_supernode("impostor", data[1], client_id="sine-00000")
        ports.append(dep.supernodes["impostor"].port)
        dep.run(APP, f"phase='collect,fit' store='{store}' num-new=0 quorum=0.5 {SMALL}")
        rejected = ModelStore(store).rounds("collect")[-1]["rejected"]
        assert list(rejected.values()) == ["client id 'sine-00000' is bound to another device"]
        assert ModelStore(store).bindings() == owners
        assert torch.allclose(ModelStore(store).zoo().weights, first, atol=1e-4)  # device 0's own model
        assert ModelStore(store).load_meta_model().ids_ == ["sine-00000", "sine-00001", "sine-00002"]

        # a new device joins later and is personalized
        dep.add_supernode("new-00000", data[3])
        ports.append(dep.supernodes["new-00000"].port)
        dep.run(APP, f"phase='personalize' store='{store}' num-new=1 finetune-steps=300 {SMALL}")
        metrics = ModelStore(store).metrics()
        assert list(metrics) == ["new-00000"]
        assert metrics["new-00000"]["score-adapted"] < metrics["new-00000"]["cold-score-adapted"]
        assert metrics["new-00000"]["score-0shot"] < metrics["new-00000"]["cold-score-0shot"]
    finally:
        pids = [dep.superlink.pid] if dep.superlink else []
        pids += [n.pid for n in dep.supernodes.values()]
        still = dep.down()
    assert still == []
    assert not any(port_open("127.0.0.1", p) for p in ports)
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()


@pytest.mark.slow
def test_supernodes_without_the_right_key_or_certificate_are_refused(tmp_path):
    dep = LocalDeployment(tmp_path / "deploy")
    data = _devices(tmp_path)
    try:
        dep.start_superlink()
        dep.add_supernode("good", data[0])
        # an unregistered key: the SuperLink refuses to activate the node, which exits
        dep.add_supernode("unregistered", data[1], register=False, timeout=15, wait=False)
        # a certificate from another CA: the TLS handshake fails, the node never connects
        other = make_certificates(tmp_path / "other-ca", ["127.0.0.1"])
        dep.add_supernode("wrong-ca", data[2], root_cert=other.ca_cert, timeout=15, wait=False)
        import time

        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and (dep.alive("unregistered") or dep.alive("wrong-ca")):
            time.sleep(0.5)
        assert not dep.alive("unregistered") and not dep.alive("wrong-ca")
        assert dep.alive("good")
        for name in ("unregistered", "wrong-ca"):
            assert "SuperNode ID:" not in Path(dep.supernodes[name].log).read_text()
        listing = dep.flwr(["supernode", "list", "--format", "json"])
        assert listing.count('"online"') == 1
    finally:
        assert dep.down() == []
