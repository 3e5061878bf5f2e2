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

from fedfuse.layout import MLPSpec
from fedfuse.wire import Upload
from fedfuse_server.store import ModelStore

WRITER = """
import sys, torch
from fedfuse.layout import MLPSpec
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
