"""A store killed with SIGKILL in the middle of writes loses no acknowledged upload."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedfuse.io import save_tensors
from fedfuse.architectures import MLPSpec
from fedfuse.wire import Upload
from fedfuse_server.store import ModelStore

WRITER = """
import sys, torch
from fedfuse.io import save_tensors
from fedfuse.architectures import MLPSpec
from fedfuse.wire import Upload
from fedfuse_server.store import ModelStore
store, start = ModelStore(sys.argv[1]), int(sys.argv[2])
spec = MLPSpec((1, 50, 1))
for seq in range(start, start + 100000):
    cid = f"dev-{seq % 40}"
    print(f"try {cid} {seq}", flush=True)
    store.put(Upload(cid, spec, torch.full((spec.num_weights,), float(seq)), [seq % 7, 1.0], seq))
    print(f"ack {cid} {seq}", flush=True)
"""


@pytest.mark.slow
def test_sigkill_during_writes_keeps_every_acknowledged_upload(tmp_path):
    rng = random.Random(0)
    acked: dict[str, int] = {}
    tried = 0
    start = 0
    for attempt in range(6):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(start)],
                                stdout=subprocess.PIPE, text=True)
        first = proc.stdout.readline()  # imports done, writing begins (a fixed sleep was too short on a slow machine)
        time.sleep(0.2 + rng.random() * 1.5)  # a random moment of writing
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        for line in (first + out).splitlines():
            kind, cid, seq = line.split()
            if kind == "ack":
                acked[cid] = max(acked.get(cid, -1), int(seq))
            else:
                tried = max(tried, int(seq))
        start = tried + 1
        # reopen after each crash: every file matches its index entry, every ack is there
        zoo = ModelStore(tmp_path).zoo()
        stored = {cid: int(w[0]) for cid, w in zip(zoo.ids, zoo.weights)}
        for cid, seq in acked.items():
            assert cid in stored, f"acknowledged upload of {cid} lost after crash {attempt}"
            assert seq <= stored[cid] <= tried  # the acknowledged version or the one in flight
        assert (zoo.weights == zoo.weights[:, :1]).all()  # no torn file
    assert sum(1 for _ in acked) == 40 and tried > 100


SPEC = MLPSpec((1, 3, 1))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c", "d"]), st.floats(-50, 50)), min_size=1, max_size=12))
def test_store_equals_a_dict_of_latest_uploads(tmp_path_factory, ops):
    root = tmp_path_factory.mktemp("store")
    store = ModelStore(root)
    expected = {}
    for cid, value in ops:
        store.put(Upload(cid, SPEC, torch.full((SPEC.num_weights,), value), [value, 0.0], 1))
        expected[cid] = value
    zoo = ModelStore(root).zoo()
    assert zoo.ids == sorted(expected)
    for cid, w in zip(zoo.ids, zoo.weights):
        assert float(w[0]) == pytest.approx(expected[cid])


FIT = """
import sys, torch
from fedfuse.runconfig import RunConfig
from fedfuse_server.phases import fit
from fedfuse_server.store import ModelStore
torch.set_num_threads(1)
print("fitting", flush=True)
fit(ModelStore(sys.argv[1]), RunConfig(fit_rounds=50, fit_steps=200, parallel="serial"), progress=False)
print("done", flush=True)
"""


@pytest.mark.slow
def test_a_fit_killed_midway_leaves_the_previous_model_and_restarts_cleanly(small_sine_zoo, tmp_path):
    from fedfuse.runconfig import RunConfig
    from fedfuse_server.phases import fit

    _, zoo = small_sine_zoo
    store = ModelStore(tmp_path)
    for cid, w, tau in zip(zoo.ids, zoo.weights, zoo.tau):
        store.put(Upload(cid, zoo.spec, w, tau.tolist(), 100))
    quick = RunConfig(fit_rounds=1, fit_steps=10, parallel="serial")
    first = fit(store, quick, progress=False)
    before = ModelStore(tmp_path).load_meta_model().personalize([1.0, 1.0]).mean
    proc = subprocess.Popen([sys.executable, "-c", FIT, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "fitting"
    time.sleep(3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    survivor = ModelStore(tmp_path).load_meta_model()  # the earlier model, intact
    assert torch.equal(survivor.personalize([1.0, 1.0]).mean, before)
    again = fit(ModelStore(tmp_path), quick, progress=False)
    assert again.ids_ == first.ids_
    assert len(list(tmp_path.glob("meta_model-*.safetensors"))) <= 2  # at most one orphan, collected later


def _age(path, seconds: float = 600.0) -> None:
    """Make a file look older than the store's grace period for files no row points to."""
    t = time.time() - seconds
    os.utime(path, (t, t))


def _lose_index(root, how: str) -> None:
    for name in ("index.sqlite", "index.sqlite-wal", "index.sqlite-shm"):
        (root / name).unlink(missing_ok=True)
    if how == "empty":
        (root / "index.sqlite").write_bytes(b"")


@pytest.mark.parametrize("how", ["missing", "empty"])
def test_a_lost_index_is_rebuilt_from_the_upload_files(tmp_path, how):
    store = ModelStore(tmp_path)
    store.put(Upload("a", SPEC, torch.full((SPEC.num_weights,), 1.0), [1.0, 0.0], 11))
    store.put(Upload("b", SPEC, torch.full((SPEC.num_weights,), 2.0), [2.0, 0.0], 22))
    files = sorted((tmp_path / "uploads").glob("*.safetensors"))
    for path in files:
        _age(path)
    _lose_index(tmp_path, how)
    zoo = ModelStore(tmp_path).zoo()
    assert zoo.ids == ["a", "b"] and zoo.n_examples == [11, 22]
    assert zoo.weights[:, 0].tolist() == [1.0, 2.0]
    assert sorted((tmp_path / "uploads").glob("*.safetensors")) == files


def test_rebuild_keeps_the_newest_file_of_a_client_and_quarantines_the_rest(tmp_path):
    store = ModelStore(tmp_path)
    store.put(Upload("a", SPEC, torch.full((SPEC.num_weights,), 1.0), [1.0, 0.0], 1))
    (older,) = (tmp_path / "uploads").glob("*.safetensors")
    content = older.read_bytes()
    store.put(Upload("a", SPEC, torch.full((SPEC.num_weights,), 2.0), [2.0, 0.0], 1))
    (newer,) = (tmp_path / "uploads").glob("*.safetensors")
    older.write_bytes(content)  # a superseded file that outlived its index, as after a crash
    _age(older, 900), _age(newer, 600)
    meta = save_tensors(tmp_path / "meta_model-0123456789ab.safetensors", {"x": torch.zeros(1)}, {})
    _age(meta)
    crashed = tmp_path / "uploads" / ".x.safetensors.abc.tmp"
    writing = tmp_path / "uploads" / ".y.safetensors.def.tmp"
    crashed.write_bytes(b"half"), writing.write_bytes(b"half")
    _age(crashed)
    _lose_index(tmp_path, "missing")
    zoo = ModelStore(tmp_path).zoo()
    assert zoo.ids == ["a"] and float(zoo.weights[0, 0]) == 2.0
    assert sorted(p.name for p in (tmp_path / "quarantine").iterdir()) == sorted([older.name, meta.name])
    assert not crashed.exists() and writing.exists()  # a crashed writer's temp file goes, a live one stays


def test_a_file_no_row_points_to_is_quarantined_never_deleted(tmp_path):
    store = ModelStore(tmp_path)
    store.put(Upload("a", SPEC, torch.full((SPEC.num_weights,), 1.0), [1.0, 0.0], 1))
    (kept,) = (tmp_path / "uploads").glob("*.safetensors")
    stray = tmp_path / "uploads" / "0123-456789abcdef.safetensors"
    stray.write_bytes(kept.read_bytes())
    young = tmp_path / "uploads" / "4567-456789abcdef.safetensors"
    young.write_bytes(kept.read_bytes())  # may be a concurrent writer's, about to be committed
    _age(stray)
    assert ModelStore(tmp_path).zoo().ids == ["a"]
    assert (tmp_path / "quarantine" / stray.name).read_bytes() == kept.read_bytes()
    assert kept.exists() and young.exists() and not stray.exists()
