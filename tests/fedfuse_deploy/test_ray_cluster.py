"""The fit joins an existing Ray cluster (``ray start --head``) through ``RAY_ADDRESS``."""

import os
import shutil
import tempfile
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedfuse.meta_model import MetaModel
from fedfuse.parallel import serial_map
from fedfuse_deploy.launcher import free_port, port_open
from fedfuse_server.ray_map import RayMap


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.mark.slow
def test_fit_joins_a_ray_cluster_through_ray_address(small_sine_zoo, tmp_path, monkeypatch):
    import ray

    port = free_port()
    temp = tempfile.mkdtemp(prefix="ray")  # Ray's socket paths must stay under 108 bytes
    ray_bin = str(Path(sys.executable).with_name("ray"))
    head = subprocess.Popen(
        [ray_bin, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
         "--block", "--disable-usage-stats", "--include-dashboard=false", f"--temp-dir={temp}"],
        stdout=open(tmp_path / "head.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not port_open("127.0.0.1", port) and time.monotonic() < deadline:
            assert head.poll() is None, (tmp_path / "head.log").read_text()
            time.sleep(0.5)
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
        _, zoo = small_sine_zoo
        settings = dict(hidden=(32,), max_rounds=2, steps_per_round=20, code_dim=4, base_dim=4,
                        chunk_size=8, seed=1)
        pmap = RayMap(force=True)
        joined = MetaModel(pmap=pmap, **settings).fit(zoo)
        assert pmap._task_cpus == 1
        assert ray.get_runtime_context().gcs_address.endswith(f":{port}")
        ray.shutdown()
        alone = MetaModel(pmap=serial_map, **settings).fit(zoo)
        for a, b in zip(joined.perms_, alone.perms_):
            assert torch.equal(a, b)
    finally:
        ray.shutdown()
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(10)
        deadline = time.monotonic() + 20
        while _group_alive(head.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        if _group_alive(head.pid):
            os.killpg(head.pid, signal.SIGKILL)
    shutil.rmtree(temp, ignore_errors=True)
    assert not port_open("127.0.0.1", port)
