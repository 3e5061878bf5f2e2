"""The adaptation report at smoke size: a small fitted sine meta-model saved as a bench would,
the script run on it, and answers that are known whatever the fit."""

import importlib.util
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
_spec = importlib.util.spec_from_file_location("adaptation_report", ROOT / "benchmarks" / "adaptation.py")
report_module = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(report_module)
zoo_choice = report_module.zoo_choice


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
    assert len(rows) == 4 * len(report_module.GRID) and all(0 <= r["zoo_worse"] <= 1 and 0 <= r["test_worse"] <= 1 for r in rows)
    for k in (10, 20, 30, 40):  # a stricter margin only turns updates down, so it harms no more devices
        for shrink in ("1", "0.5"):
            for key in ("zoo_worse", "test_worse"):
                worse = [next(r[key] for r in rows if r["shots"] == k and r["rule"] == f"t {t}, shrink {shrink}, best strength, 5-fold")
                         for t in range(4)]
                assert worse == sorted(worse, reverse=True)
    assert report["zoo_choice"] == zoo_choice(rows)
    cov = report["covariance"]["0"]
    fn = model.function_
    assert cov["choice"] == (f"{fn.nearby_size_} nearby, lam {fn.nearby_shrink_}" if fn.nearby_size_ else "shared")
    edges = report["edges"]["0"]
    assert 0 < edges["readout floor nRMSE"] <= edges["0-shot nRMSE"]  # the best readout on the same features
    assert len(report["covariance_rows"]) == 4 * 3 * 2
    assert f"The zoo's choice: **{report['zoo_choice']}**" in (tmp_path / "out" / "adaptation.md").read_text()
    gate = report["gate_cost"]  # the oracle takes the update only where it helps: below both ways
    assert [r["shots"] for r in gate] == [10, 20, 30, 40]
    device = report_module.rule_name(report_module.RULES["mse", False])
    for r in gate:
        assert r["oracle_nrmse"] <= min(r["every_nrmse"], edges["0-shot nRMSE"]) + 1e-6
        assert 0 <= r["every_worse"] <= 1 and 0 <= r["device_worse"] <= 1
        same = next(a for a in rows if a["shots"] == r["shots"] and a["rule"] == device)  # the grid's row of the rule
        assert r["device_nrmse"] == pytest.approx(same["test_nrmse"]) and r["device_worse"] == pytest.approx(same["test_worse"])
    # the distilled path: the same report on the distilled initializers and pseudo-devices
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "adaptation.py"), "--bench", str(tmp_path),
                          "--out", str(tmp_path / "distilled"), "--n-test", "10", "--distill"],
                         capture_output=True, text=True, timeout=580)
    assert res.returncode == 0, res.stderr[-3000:]
    distilled = json.loads((tmp_path / "distilled" / "adaptation.json").read_text())
    assert distilled["edges"]["0"]["0-shot nRMSE"] != edges["0-shot nRMSE"]
    assert [r["zoo_ratio"] for r in distilled["acceptance"]] != [r["zoo_ratio"] for r in rows]
    assert len(distilled["acceptance"]) == 4 * len(report_module.GRID)


def test_the_zoos_choice_is_the_lowest_zoo_error_within_the_harm_bound_on_every_row():
    def rows(rule, ratios, worse):
        return [{"rule": rule, "shots": k, "zoo_ratio": r, "zoo_worse": w} for k, r, w in zip((10, 40), ratios, worse)]

    at_bound = float(torch.tensor(10 / 200, dtype=torch.float32))  # 10 of 200 devices, as a float32 mean
    table = (rows("strict", (0.9, 0.8), (0.01, 0.02)) + rows("at the bound", (0.8, 0.7), (at_bound, 0.03))
             + rows("one row over", (0.5, 0.4), (0.02, 0.055)) + rows("low on average", (0.7, 0.9), (0.04, 0.04)))
    assert zoo_choice(table) == "at the bound"  # 1.5 against 1.6 and 1.7; "one row over" is out
    assert zoo_choice(rows("over", (0.5, 0.5), (0.06, 0.01))) is None


def test_the_adaptation_report_says_what_is_missing(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "adaptation.py"), "--bench", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "holds no meta_model_seed" in res.stderr
