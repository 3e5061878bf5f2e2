"""A reader sees one consistent snapshot of the store while another process replaces uploads."""

import json
import subprocess
import sys

import pytest
import torch

from fedfuse.architectures import MLPSpec
from fedfuse.wire import Upload
from fedfuse_server.store import ModelStore

CLIENTS = 8
SPEC = MLPSpec((1, 20, 1))
# Each child imports first, says "ready", then works for as many seconds as it reads from stdin.
WRITER = f"""
import json, sys, time, torch
from fedfuse.architectures import MLPSpec
from fedfuse.wire import Upload
from fedfuse_server.store import ModelStore
store, spec = ModelStore(sys.argv[1]), MLPSpec((1, 20, 1))
print("ready", flush=True)
until, seq = time.monotonic() + float(sys.stdin.readline()), {CLIENTS}
while time.monotonic() < until:
    w = torch.full((spec.num_weights,), float(seq))
    store.put(Upload(f"dev-{{seq % {CLIENTS}}}", spec, w, [float(seq % 7), 1.0], seq))
    seq += 1
print(json.dumps({{"writes": seq - {CLIENTS}}}), flush=True)
"""
READER = f"""
import json, sys, time
from fedfuse_server.store import ModelStore
store = ModelStore(sys.argv[1])
print("ready", flush=True)
until, reads, failed = time.monotonic() + float(sys.stdin.readline()), 0, []
while time.monotonic() < until:
    reads += 1
    try:
        zoo = store.zoo()
        assert zoo.ids == [f"dev-{{i}}" for i in range({CLIENTS})], zoo.ids
        assert not store.unreadable(), [str(p) for p in store.unreadable()]
        assert (zoo.weights == zoo.weights[:, :1]).all(), "a torn file"
    except Exception as exc:
        failed.append(repr(exc))
print(json.dumps({{"reads": reads, "failed": len(failed), "first": failed[:3]}}), flush=True)
"""


@pytest.mark.slow
def test_readers_never_fail_while_another_process_replaces_uploads(tmp_path):
    store = ModelStore(tmp_path)
    for i in range(CLIENTS):
        store.put(Upload(f"dev-{i}", SPEC, torch.full((SPEC.num_weights,), float(i)), [float(i % 7), 1.0], i))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for code in (WRITER, READER)]
    try:
        for proc in procs:
            assert proc.stdout.readline().strip() == "ready"
        for proc in procs:
            proc.stdin.write("6\n")
            proc.stdin.flush()
        writer, reader = (json.loads(proc.communicate(timeout=60)[0]) for proc in procs)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert reader["failed"] == 0, f"{reader['failed']} of {reader['reads']} reads failed: {reader['first']}"
    assert writer["writes"] > 20 and reader["reads"] > 10
    zoo = ModelStore(tmp_path).zoo()  # with no reader left, opening deletes what was superseded
    assert zoo.ids == [f"dev-{i}" for i in range(CLIENTS)] and not list((tmp_path / "quarantine").glob("*"))
    assert len(list((tmp_path / "uploads").glob("*.safetensors"))) == CLIENTS
