"""The rule-transfer report at smoke size on the bump example family: every rule scored on one
fresh zoo's pseudo-devices and on new devices, and answers that are known whatever the fit."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "rule_transfer.py"
_spec = importlib.util.spec_from_file_location("adaptation_report", ROOT / "benchmarks" / "adaptation.py")
adaptation = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(adaptation)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_rule_transfer_report_scores_every_rule_on_a_fresh_zoo_of_another_family(tmp_path):
    res = subprocess.run([sys.executable, str(SCRIPT), "--family", "bump_family:BumpFamily", "--devices", "24",
                          "--n-test", "6", "--seeds", "3", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=580)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "rule_transfer.json").read_text())
    rows = report["rows"]
    assert len(rows) == 4 * 64 and {r["seed"] for r in rows} == {3}
    assert all(0 <= r["zoo_worse"] <= 1 and 0 <= r["test_worse"] <= 1 and r["test_score"] > 0 for r in rows)
    for k in (10, 20, 30, 40):  # a stricter margin only turns updates down, so it harms no more devices
        for key in ("zoo_worse", "test_worse"):
            worse = [next(r[key] for r in rows if r["shots"] == k and r["rule"] == f"t {t}, shrink 1, best strength, 5-fold")
                     for t in range(4)]
            assert worse == sorted(worse, reverse=True)
    assert report["zoo_choice"] == {"3": adaptation.zoo_choice(rows)}
    assert report["default"] == "t 2, shrink 1, any strength, leave-one-out"  # RULES["mse", False]
    assert f"Default (`RULES`, chosen on the sine zoos): **{report['default']}**" in (tmp_path / "rule_transfer.md").read_text()


def test_the_rule_transfer_report_refuses_a_family_without_squared_error(tmp_path):
    res = subprocess.run([sys.executable, str(SCRIPT), "--family", "mnist", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "the grid is the squared-error device's" in res.stderr
