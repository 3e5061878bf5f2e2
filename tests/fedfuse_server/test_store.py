import hashlib
import logging
import sqlite3

import pytest
import torch

from fedfuse.errors import FedfuseError, ZooError
from fedfuse.io import save_tensors
from fedfuse.architectures import MLPSpec
from fedfuse.errors import MessageRejected
from fedfuse.wire import Upload
from fedfuse_server.store import ModelStore

SPEC = MLPSpec((1, 5, 1))


def _upload(cid: str, scale: float = 1.0) -> Upload:
    return Upload(cid, SPEC, scale * torch.ones(SPEC.num_weights), [scale, 0.5], 10)


def test_reupload_replaces_and_a_new_instance_finds_everything(tmp_path):
    store = ModelStore(tmp_path)
    store.put(_upload("a"))
    store.put(_upload("b"))
    store.put(_upload("a", 2.0))
    again = ModelStore(tmp_path)
    zoo = again.zoo()
    assert zoo.ids == ["a", "b"]
    assert torch.equal(zoo.weights[0], 2.0 * torch.ones(SPEC.num_weights))
    assert len(list((tmp_path / "uploads").glob("*.safetensors"))) == 2


def test_empty_store_and_missing_model_say_what_to_run(tmp_path):
    store = ModelStore(tmp_path)
    with pytest.raises(ZooError, match="run the collect phase first"):
        store.zoo()
    with pytest.raises(FedfuseError, match="run the fit phase first"):
        store.load_meta_model()


def test_tampered_file_is_detected(tmp_path):
    store = ModelStore(tmp_path)
    store.put(_upload("a"))
    path = next((tmp_path / "uploads").glob("*.safetensors"))
    path.write_bytes(path.read_bytes()[:-4] + b"\x00\x00\x00\x00")
    with pytest.raises(FedfuseError, match="does not match its index entry"):
        store.zoo()


def test_metrics_are_keyed_by_client_and_run(tmp_path):
    store = ModelStore(tmp_path)
    store.record_metrics("x", "1", {"score-0shot": 0.5})
    store.record_metrics("x", "1", {"score-0shot": 0.4})
    store.record_metrics("x", "2", {"score-0shot": 0.3})
    assert store.metrics("1") == {"x": {"score-0shot": 0.4}}
    assert len(store.metrics()) == 1  # keyed by client: the latest run's entry


def test_put_refuses_what_would_not_be_finite_once_stored(tmp_path):
    """1e39 is finite in float64 and inf in the float32 the store keeps: stored, it would make
    every later zoo unusable."""
    store = ModelStore(tmp_path)
    with pytest.raises(MessageRejected, match="client 'p'.*descriptor.*not finite as float32"):
        store.put(Upload("p", SPEC, torch.ones(SPEC.num_weights), [1e39, 0.5], 10))
    weights = torch.ones(SPEC.num_weights, dtype=torch.float64)
    weights[3] = -1e39
    with pytest.raises(MessageRejected, match="client 'q'.*weights.*not finite as float32"):
        store.put(Upload("q", SPEC, weights, [1.0, 0.5], 10))
    with pytest.raises(MessageRejected, match="client 'r' has 3 weights"):
        store.put(Upload("r", SPEC, torch.ones(3), [1.0, 0.5], 10))
    assert store.ids() == [] and not list((tmp_path / "uploads").glob("*"))


def _overwrite(root, cid: str, data: bytes | None, index_hash: bool = True) -> None:
    """Replace an entry's file as a store without today's checks, or a damaged disk, would have
    left it (``None``: the file is gone); ``index_hash`` keeps the index's hash in step."""
    with sqlite3.connect(root / "index.sqlite") as db:
        (rel,) = db.execute("SELECT file FROM uploads WHERE client_id = ?", (cid,)).fetchone()
        if data is None:
            (root / rel).unlink()
            return
        (root / rel).write_bytes(data)
        if index_hash:
            db.execute("UPDATE uploads SET sha256 = ? WHERE client_id = ?", (hashlib.sha256(data).hexdigest(), cid))


def _file(tmp_path, tensors, meta) -> bytes:
    return save_tensors(tmp_path / "scratch" / "f.safetensors", tensors, meta).read_bytes()


BAD = {
    "inf descriptor": (lambda t: _file(t, {"weights": torch.ones(SPEC.num_weights), "tau": torch.tensor([float("inf"), 0.5])},
                                       {"client_id": "b", "spec": SPEC.to_dict()}), True, "not finite"),
    "nan weights": (lambda t: _file(t, {"weights": torch.full((SPEC.num_weights,), float("nan")), "tau": torch.ones(2)},
                                    {"client_id": "b", "spec": SPEC.to_dict()}), True, "not finite"),
    "wrong size": (lambda t: _file(t, {"weights": torch.ones(3), "tau": torch.ones(2)},
                                   {"client_id": "b", "spec": SPEC.to_dict()}), True, "3 weights"),
    "another client's": (lambda t: _file(t, {"weights": torch.ones(SPEC.num_weights), "tau": torch.ones(2)},
                                         {"client_id": "a", "spec": SPEC.to_dict()}), True, "names client 'a'"),
    "other architecture": (lambda t: _file(t, {"weights": torch.ones(MLPSpec((1, 2, 1)).num_weights), "tau": torch.ones(2)},
                                           {"client_id": "b", "spec": MLPSpec((1, 2, 1)).to_dict()}), True,
                           "differs from the zoo's"),
    "garbage": (lambda t: b"not a safetensors file", True, "not a readable safetensors file"),
    "tampered": (lambda t: b"not a safetensors file", False, "does not match its index entry"),
    "missing": (lambda t: None, True, "cannot be read"),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_one_bad_entry_is_skipped_and_reported_never_blocking_the_zoo(tmp_path, caplog, kind):
    make, index_hash, reason = BAD[kind]
    store = ModelStore(tmp_path / "store")
    for cid in "abc":
        store.put(_upload(cid))
    _overwrite(tmp_path / "store", "b", make(tmp_path), index_hash)
    with caplog.at_level(logging.WARNING, logger="fedfuse_server.store"):
        zoo = store.zoo()
    assert zoo.ids == ["a", "c"]
    (problem,) = store.unreadable()
    assert problem.client_id == "b" and reason in problem.reason
    assert "'b'" in caplog.text and reason in caplog.text
    store.put(_upload("b"))  # a new upload replaces the bad entry
    assert store.zoo().ids == ["a", "b", "c"] and store.unreadable() == []


def test_a_quarantined_entry_leaves_the_zoo_but_keeps_its_file_and_reason(tmp_path):
    store = ModelStore(tmp_path)
    store.put(_upload("a"))
    store.put(_upload("b", 2.0))
    store.quarantine("b", "outlier in the fit's screen")
    assert store.zoo().ids == ["a"] and store.ids() == ["a"]
    (entry,) = [e for e in store.entries() if e.client_id == "b"]
    assert (entry.status, entry.reason, entry.n_examples) == ("quarantined", "outlier in the fit's screen", 10)
    assert entry.descriptor == [2.0, 0.5] and (tmp_path / entry.file).is_file()
    assert entry.file.startswith("quarantine/")
    with pytest.raises(FedfuseError, match="no entry for client 'zz'"):
        store.quarantine("zz", "?")
    store.put(_upload("b", 3.0))  # a new upload is judged afresh
    assert ModelStore(tmp_path).zoo().ids == ["a", "b"]
