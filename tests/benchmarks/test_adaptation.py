"""The adaptation report at smoke size: a small fitted sine meta-model saved as a bench would,
the script run on it, and answers that are known whatever the fit."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedfuse.meta_model import MetaModel
from fedfuse.tasks import sine
from fedfuse.zoo import ModelZoo

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_adaptation_report_runs_on_saved_fits(tmp_path):
    tasks = sine.sample_tasks(30, seed=0)
    zoo = ModelZoo(sine.SPEC, sine.pretrain(tasks, seed=1, points=50, steps=150), tasks.tau,
                   [f"sine-{i:05d}" for i in range(30)])
    model = MetaModel(hidden=(32,), max_rounds=2, steps_per_round=30, code_dim=4, base_dim=4, seed=0, distill_steps=100)
    model.fit(zoo, probe=sine.probe_grid(64)).save(tmp_path / "meta_model_seed0.safetensors")
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "adaptation.py"), "--bench", str(tmp_path),
                          "--out", str(tmp_path / "out"), "--n-test", "10"], capture_output=True, text=True, timeout=580)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "adaptation.json").read_text())
    bins = {k: v for k, v in report["edges"]["0"].items() if isinstance(v, list)}
    assert set(bins) == {"uploads", "GP prediction", "initializer"}
    assert all(len(v) == 8 and min(v) >= 0 for v in bins.values())
    rows = report["acceptance"]
    assert len(rows) == 4 * 4 and all(0 <= r["zoo_worse"] <= 1 and 0 <= r["test_worse"] <= 1 for r in rows)
    for k in (10, 20, 30, 40):  # a stricter rule only turns updates down, so it harms no more devices
        for key in ("zoo_worse", "test_worse"):
            worse = [r[key] for r in sorted(rows, key=lambda r: r["threshold"]) if r["shots"] == k]
            assert worse == sorted(worse, reverse=True)
    cov = report["covariance"]["0"]
    fn = model.function_
    assert cov["choice"] == (f"{fn.nearby_size_} nearby, lam {fn.nearby_shrink_}" if fn.nearby_size_ else "shared")
    edges = report["edges"]["0"]
    assert 0 < edges["readout floor nRMSE"] <= edges["0-shot nRMSE"]  # the best readout on the same features
    assert len(report["covariance_rows"]) == 4 * 3 * 2
    assert "## Acceptance threshold" in (tmp_path / "out" / "adaptation.md").read_text()
    # the distilled path: the same report on the distilled initializers and pseudo-devices
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "adaptation.py"), "--bench", str(tmp_path),
                          "--out", str(tmp_path / "distilled"), "--n-test", "10", "--distill"],
                         capture_output=True, text=True, timeout=580)
    assert res.returncode == 0, res.stderr[-3000:]
    distilled = json.loads((tmp_path / "distilled" / "adaptation.json").read_text())
    assert distilled["edges"]["0"]["0-shot nRMSE"] != edges["0-shot nRMSE"]
    assert [r["zoo_ratio"] for r in distilled["acceptance"]] != [r["zoo_ratio"] for r in rows]
    assert len(distilled["acceptance"]) == 4 * 4


def test_the_adaptation_report_says_what_is_missing(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "adaptation.py"), "--bench", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "holds no meta_model_seed" in res.stderr
