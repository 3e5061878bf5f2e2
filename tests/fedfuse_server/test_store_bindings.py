"""A client id belongs to the device that first uploaded it: the store records the binding,
refuses another device's upload under that id, and keeps the binding through a lost index."""

import os
import time

import pytest
import torch

from fedfuse.architectures import MLPSpec
from fedfuse.errors import MessageRejected
from fedfuse.io import peek_tensors
from fedfuse.wire import Upload
from fedfuse_server.store import ModelStore, rebuild_index

SPEC = MLPSpec((1, 5, 1))


def _upload(cid: str, value: float = 1.0) -> Upload:
    return Upload(cid, SPEC, torch.full((SPEC.num_weights,), value), [value, 0.5], 10)


def test_an_id_is_bound_to_the_device_that_first_uploaded_it(tmp_path):
    store = ModelStore(tmp_path)
    store.put(_upload("a"), node="key:1")
    with pytest.raises(MessageRejected, match="client id 'a' is bound to another device"):
        store.put(_upload("a", 2.0), node="key:2")
    assert float(store.zoo().weights[0, 0]) == 1.0
    assert len(list((tmp_path / "uploads").glob("*.safetensors"))) == 1  # the refused file is not kept
    store.put(_upload("a", 3.0), node="key:1")  # its own device replaces it
    assert float(store.zoo().weights[0, 0]) == 3.0
    assert store.bindings() == {"a": "key:1"}
    (path,) = (tmp_path / "uploads").glob("*.safetensors")
    assert peek_tensors(path)[1]["node"] == "key:1"  # the file names its device too


def test_an_upload_without_a_device_binds_nothing(tmp_path):
    store = ModelStore(tmp_path)
    store.put(_upload("a"))  # the operator's or a library user's own upload
    assert store.bindings() == {}
    store.put(_upload("a", 2.0), node="key:2")
    assert store.bindings() == {"a": "key:2"}


def _age(path, seconds: float = 600.0) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


@pytest.mark.parametrize("how", ["lost", "rebuild-index", "unreadable"])
def test_bindings_survive_a_lost_or_rebuilt_index(tmp_path, how):
    store = ModelStore(tmp_path)
    store.put(_upload("a"), node="key:1")
    store.put(_upload("b"), node="key:2", run="7")
    for path in (tmp_path / "uploads").glob("*.safetensors"):
        _age(path)
    if how == "rebuild-index":
        rebuild_index(tmp_path)  # the old index is carried over
    else:
        for name in ("index.sqlite", "index.sqlite-wal", "index.sqlite-shm"):
            (tmp_path / name).unlink(missing_ok=True)
        if how == "unreadable":  # set aside unreadable: the upload files alone rebuild the bindings
            (tmp_path / "index.sqlite").write_bytes(b"garbage" * 100)
            rebuild_index(tmp_path)
    again = ModelStore(tmp_path)
    assert again.bindings() == {"a": "key:1"} and again.bindings("7") == {"a": "key:1", "b": "key:2"}
    with pytest.raises(MessageRejected, match="bound to another device"):
        again.put(_upload("a", 2.0), node="key:3")


def test_a_simulation_runs_bindings_hold_for_that_run_only(tmp_path):
    store = ModelStore(tmp_path)
    store.put(_upload("a"), node="key:1", run="7")
    with pytest.raises(MessageRejected, match="bound to another device"):
        store.put(_upload("a", 2.0), node="key:2", run="7")
    assert store.bindings("8") == {}  # simulated nodes get new keys every run
    store.put(_upload("a", 3.0), node="key:3", run="8")
    assert store.bindings("8") == {"a": "key:3"} and store.bindings("7") == {}


def test_removing_an_entry_releases_its_id(tmp_path):
    store = ModelStore(tmp_path)
    store.put(_upload("a"), node="key:1")
    store.remove("a")  # `fedfuse store rm`: e.g. a device that lost its key re-registers
    assert store.bindings() == {}
    store.put(_upload("a", 2.0), node="key:2")
    assert store.bindings() == {"a": "key:2"}
