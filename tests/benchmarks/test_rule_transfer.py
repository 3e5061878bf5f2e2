"""The rule-transfer report at smoke size on the bump example family: every rule scored on one
fresh zoo's pseudo-devices and on new devices, and answers that are known whatever the fit."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedfuse.tasks import DeviceConfig, get_family

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "rule_transfer.py"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)  # dataclasses and the script's imports look it up
    spec.loader.exec_module(module)
    return module


adaptation = _load("adaptation")
rule_transfer = _load("rule_transfer")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_rule_transfer_report_scores_every_rule_on_a_fresh_zoo_of_another_family(tmp_path):
    sine = [{"rule": rule, "shots": k, "zoo_ratio": ratio, "zoo_worse": 0.01}
            for rule, ratio in (("t 0, shrink 1, best strength, 5-fold", 0.5), ("t 3, shrink 1, best strength, 5-fold", 0.9))
            for k in (10, 20, 30, 40)]
    (tmp_path / "sine.json").write_text(json.dumps({"acceptance": sine, "distill": False}))
    # another family's report over the whole grid, in which both sine rules harm every device
    other = [{"rule": adaptation.rule_name(rule), "shots": k, "seed": 0,
              "test_worse": float(adaptation.rule_name(rule) in {r["rule"] for r in sine})}
             for rule in adaptation.GRID for k in (10, 20, 30, 40)]
    (tmp_path / "other.json").write_text(json.dumps({"family": "other", "rows": other, "distill": False}))
    res = subprocess.run([sys.executable, str(SCRIPT), "--family", "bump_family:BumpFamily", "--devices", "24",
                          "--n-test", "6", "--seeds", "3", "--out", str(tmp_path), "--sine", str(tmp_path / "sine.json"),
                          "--also", str(tmp_path / "other.json")], capture_output=True, text=True, timeout=580)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "rule_transfer.json").read_text())
    rows = report["rows"]
    assert len(rows) == 4 * len(adaptation.GRID) and {r["seed"] for r in rows} == {3}
    assert all(0 <= r["zoo_worse"] <= 1 and 0 <= r["test_worse"] <= 1 and r["test_score"] > 0 for r in rows)
    for k in (10, 20, 30, 40):  # a stricter margin only turns updates down, so it harms no more devices
        for key in ("zoo_worse", "test_worse"):
            worse = [next(r[key] for r in rows if r["shots"] == k and r["rule"] == f"t {t}, shrink 1, best strength, 5-fold")
                     for t in range(4)]
            assert worse == sorted(worse, reverse=True)
    assert report["zoo_choice"] == {"3": adaptation.zoo_choice(rows)}
    assert report["validated_on"] == {"bump_family:BumpFamily": [3], "other": [0]}
    assert rule_transfer.validated_choice(sine, rows) is not None  # the bump zoo alone passes a rule
    assert report["validated_choice"] is None  # which the other family refuses
    assert report["default"] == "t 3, shrink 1, any strength, 5-fold, absolute error, t 2 from misfit 0.01"  # RULES["mse", False]
    assert f"Default (`RULES`): **{report['default']}**" in (tmp_path / "rule_transfer.md").read_text()


def test_the_step_validation_family_has_noisy_shots_and_is_scored_against_the_noiseless_step():
    from bump_family.steps import step  # the example package, installed by the Makefile

    family = get_family("bump_family.steps:StepFamily")
    cfg = DeviceConfig(num_clients=4, num_new=2, seed=1, shots=20)
    zoo_device, new_device = family.simulated_device(0, cfg), family.simulated_device(5, cfg)
    assert new_device.x.shape == (20, 1) and zoo_device.x.shape == (100, 1)
    for d in (zoo_device, new_device):
        family.descriptor.check(d.tau)  # raises outside the domain
        tau = torch.tensor([d.tau])
        noise = d.y - step(tau, d.x)[0]
        assert 0.03 < float(noise.std()) < 0.07  # NOISE on the examples and shots
        assert torch.equal(d.y_eval, step(tau, d.x_eval)[0])  # none where the device is scored
    assert new_device.tau != family.simulated_device(4, cfg).tau  # new devices differ


def test_the_wave_validation_family_has_two_inputs_noisy_shots_and_is_scored_off_the_probe():
    from bump_family.waves import wave  # the example package, installed by the Makefile

    family = get_family("bump_family.waves:WaveFamily")
    cfg = DeviceConfig(num_clients=4, num_new=2, seed=1, shots=20)
    zoo_device, new_device = family.simulated_device(0, cfg), family.simulated_device(5, cfg)
    assert new_device.x.shape == (20, 2) and zoo_device.x.shape == (100, 2)
    probe = family.probe()
    assert probe.shape == (64, 2) and family.arch.sizes[0] == 2
    for d in (zoo_device, new_device):
        family.descriptor.check(d.tau)  # raises outside the domain
        tau = torch.tensor([d.tau])
        noise = d.y - wave(tau, d.x)[0]
        assert 0.07 < float(noise.std()) < 0.13  # NOISE on the examples and shots
        assert torch.equal(d.y_eval, wave(tau, d.x_eval)[0])  # none where the device is scored
        # scored on a finer grid than the probe: only its corners are probe inputs
        shared = (d.x_eval[:, None] == probe[None]).all(-1).any(1)
        assert d.x_eval.shape == (400, 2) and int(shared.sum()) == 4
    # a wave along x1 with phase 0 is odd in x1 and flat along x2
    tau = torch.tensor([[1.5, 0.0, 1.0, 0.0]])
    x = torch.tensor([[0.7, -1.0], [-0.7, 1.3]])
    y = wave(tau, x)[0, :, 0]
    assert torch.allclose(y, torch.tensor([1.5 * math.sin(0.7), -1.5 * math.sin(0.7)]))


def test_the_rule_transfer_report_refuses_a_family_without_squared_error(tmp_path):
    res = subprocess.run([sys.executable, str(SCRIPT), "--family", "mnist", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "the grid is the squared-error device's" in res.stderr


def test_the_validated_choice_is_the_sine_zoos_choice_among_the_rules_the_family_does_not_harm():
    def sine(rule, ratio):
        return [{"rule": rule, "shots": k, "zoo_ratio": ratio, "zoo_worse": 0.03} for k in (10, 20, 30, 40)]

    def family(rule, worse_at_20):  # seed 0's new devices at 20 shots; every other share 2 %
        return [{"rule": rule, "shots": k, "seed": s, "test_worse": worse_at_20 if (k, s) == (20, 0) else 0.02}
                for k in (10, 20, 30, 40) for s in range(3)]

    rows = sine("low", 0.5) + sine("high", 0.9)
    assert rule_transfer.validated_choice(rows, family("low", 0.11) + family("high", 0.5)) == "low"  # 5.0 % pooled
    assert rule_transfer.validated_choice(rows, family("low", 0.12) + family("high", 0.02)) == "high"  # 5.3 %
    assert rule_transfer.validated_choice(rows, family("low", 0.12) + family("high", 0.12)) is None
    # a rule the family never scored, or scored at some shot counts only, is not validated
    assert rule_transfer.validated_choice(rows, family("high", 0.02)) == "high"
    partial = [r for r in family("low", 0.02) if r["shots"] != 40]
    assert rule_transfer.validated_choice(rows, partial + family("high", 0.02)) == "high"
    # the sine zoos' own bound still applies
    over = [dict(r, zoo_worse=0.06) if r["shots"] == 10 else r for r in sine("cheapest", 0.1)]
    assert rule_transfer.validated_choice(over + rows, family("cheapest", 0.0) + family("low", 0.02)) == "low"
    # with two families a rule must pass each, not their pool
    passes, harms = family("low", 0.02) + family("high", 0.02), family("low", 0.14) + family("high", 0.02)
    # "low" leaves 6 % of the second family worse (4 % of the two pooled)
    assert rule_transfer.validated_choice(rows, passes, harms) == "high"
    assert rule_transfer.validated_choice(rows, harms, passes) == "high"
    assert rule_transfer.validated_choice(rows, passes, family("high", 0.02)) == "high"  # "low" unscored on one
    with pytest.raises(ValueError, match="at least one family"):
        rule_transfer.validated_choice(rows)


def test_the_validation_refuses_a_report_of_the_other_path(tmp_path):
    (tmp_path / "sine.json").write_text(json.dumps({"acceptance": [], "distill": True}))
    res = subprocess.run([sys.executable, str(SCRIPT), "--sine", str(tmp_path / "sine.json"), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "distilled path's report" in res.stderr
    (tmp_path / "sine.json").write_text(json.dumps({"acceptance": [], "distill": False}))
    for other, refusal in (({"family": "x", "rows": [], "distill": True}, "other.json is the distilled path's report"),
                           ({"rows": [], "distill": False}, "is not a rule_transfer.json report"),
                           ({"family": "bump_family:BumpFamily", "rows": [], "distill": False}, "validated on twice"),
                           ({"family": "x", "rows": [{"rule": "t 2, shrink 1, best strength, 5-fold"}], "distill": False},
                            "another grid of rules")):
        (tmp_path / "other.json").write_text(json.dumps(other))
        res = subprocess.run([sys.executable, str(SCRIPT), "--sine", str(tmp_path / "sine.json"), "--also",
                              str(tmp_path / "other.json"), "--out", str(tmp_path)], capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 2 and refusal in res.stderr, res.stderr[-500:]
