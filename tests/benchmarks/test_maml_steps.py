"""The MAML meta-steps report at smoke size: it runs, scores every checkpoint and writes both files."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_maml_steps_report_scores_each_checkpoint(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "maml_steps.py"), "--out", str(tmp_path),
                          "--steps", "40", "--every", "20", "--n-test", "4", "--arch", "MAML [1-40-40-1]"],
                         capture_output=True, text=True, timeout=280)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads((tmp_path / "maml_steps.json").read_text())["rows"]
    assert [r["meta_steps"] for r in rows] == [20, 40]
    scores = [r[f"{a} {k}"] for r in rows for a in ("adam", "own SGD") for k in (0, 10, 20, 30, 40)]
    assert all(math.isfinite(v) and v > 0 for v in scores)
    assert all(r["adam 0"] == r["own SGD 0"] for r in rows)  # 0 shots: both are the base net itself
    assert (tmp_path / "maml_steps.png").stat().st_size > 0
    table = (tmp_path / "maml_steps.md").read_text().splitlines()
    assert len(table) == 2 + len(rows) and "own SGD, 40 shots" in table[0]
