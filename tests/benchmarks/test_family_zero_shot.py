"""The 0-shot comparison on another family at smoke size: every method scored on every new
device, and the table's 'ours better' share computed from those scores."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "family_zero_shot.py"
METHODS = ["ours", "ours, distilled", "no-align", "no-align, distilled", "k-NN aligned", "1-NN", "zoo average"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_every_method_is_scored_on_every_new_device(tmp_path):
    res = subprocess.run([sys.executable, str(SCRIPT), "--family", "bump_family:BumpFamily", "--devices", "24",
                          "--n-test", "6", "--seeds", "0", "--held-out", "4", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=280)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "family_zero_shot.json").read_text())
    scores = report["scores"]["0"]
    assert list(scores) == METHODS and all(len(v) == 6 for v in scores.values())
    assert report["score"] == "RMSE" and not report["higher_is_better"]
    from fedfuse.fitter import READOUT_RIDGES
    fits = report["fits"]["0"]
    assert set(fits) == {"ours", "no-align"}
    assert all(f["readout_ridge"] in READOUT_RIDGES and len(f["readout_errors"]) == len(READOUT_RIDGES) for f in fits.values())
    # the zoo average ignores the descriptor: the GP beats it on the smoke zoo
    assert sum(scores["ours"]) < sum(scores["zoo average"])
    md = (tmp_path / "family_zero_shot.md").read_text().splitlines()
    rows = {line.split(" | ")[0][2:]: line for line in md[2 : 2 + len(METHODS)]}
    assert list(rows) == METHODS
    # the new devices at every candidate ridge and step count; at the chosen ones, the fast and
    # distilled paths' own scores
    from fedfuse.fitter import DISTILL_STEPS
    assert report["held_out"] == 4
    for suffix, chosen, candidates, method in (("ridge", "readout_ridge", READOUT_RIDGES, "ours"),
                                               ("steps", "distill_steps", DISTILL_STEPS, "ours, distilled")):
        by = fits["ours"][f"new_devices_by_{suffix}"]
        assert list(by) == [str(c) for c in candidates]
        assert by[str(fits["ours"][chosen])] == pytest.approx(sum(scores[method]) / 6, rel=1e-6)
        first = md.index(next(line for line in md if line.startswith("| seed | devices |") and str(candidates[1]) in line))
        new_row, task_row, upload_row = md[first + 2 : first + 5]
        assert new_row.startswith(f"| 0 | new devices | {fits['ours'][chosen]:g} | {float(min(by, key=by.get)):g} | ")
        # the devices held out of the fit, by their task and by their uploads, at every candidate
        for key, row in ((f"held_out_by_{suffix}", task_row), (f"held_out_uploads_by_{suffix}", upload_row)):
            held = fits["ours"][key]
            assert list(held) == [str(c) for c in candidates] and all(math.isfinite(v) and v > 0 for v in held.values())
            assert row.startswith("| 0 | held out") and row.endswith(" | ".join(f"{held[str(c)]:.4f}" for c in candidates) + " |")
        # relative error against their uploads: each upload's own mean over the probe scores exactly 1
        assert max(fits["ours"][f"held_out_uploads_by_{suffix}"].values()) < 1
    # the choices as a figure, from the simulated devices' errors the fit chose by
    assert list(fits["ours"]["distill_errors"]) == [str(c) for c in DISTILL_STEPS]
    assert (tmp_path / "choices.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    better = sum(o < m for o, m in zip(scores["ours"], scores["1-NN"])) / 6
    assert rows["1-NN"].endswith(f"| {100 * better:.0f} % |")
