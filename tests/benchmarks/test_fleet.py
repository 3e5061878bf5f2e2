"""The fleet benchmark at smoke size: a real `flwr run` of 20 devices through every phase, with
every process it started stopped and its port closed afterwards."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_fleet_benchmark_runs_every_phase_and_leaves_nothing_running(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fleet.py"), "--devices", "20",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=580)
    assert res.returncode == 0, res.stderr[-3000:]
    row = json.loads(res.stdout.splitlines()[0])
    assert row["completed"] == ["collect", "fit", "personalize"], row.get("log_tail")
    assert set(row["phase_s"]) == {"collect", "fit", "personalize"} and all(s > 0 for s in row["phase_s"].values())
    assert row["uploads"] == 18 and row["personalized"] == 2
    assert row["peak_rss_mb"] > 0 and row["processes_seen"] >= 3  # flwr, the SuperLink and below
    assert row["leftover_pids"] == [] and row["listening"] is False
    assert "| 20 |" in res.stdout
