"""A store killed with SIGKILL in the middle of writes loses no acknowledged upload."""

import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedfuse.architectures import MLPSpec
from fedfuse.wire import Upload
from fedfuse_server.store import ModelStore

WRITER = """
import sys, torch
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
        time.sleep(1.5 + rng.random() * 1.5)  # import time plus a random moment of writing
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        for line in out.splitlines():
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
