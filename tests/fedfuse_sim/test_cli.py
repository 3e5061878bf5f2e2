import json

import pytest
from typer.testing import CliRunner

from fedfuse_sim.cli import app


@pytest.mark.slow
def test_sine_quick_writes_table_json_csv_and_plots(tmp_path):
    result = CliRunner().invoke(app, ["sine", "--quick", "--out", str(tmp_path), "--threads", "1"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    ours, cold = summary["summary"]["ours"], summary["summary"]["cold-start"]
    assert ours["0"][0] < cold["0"][0]
    for name in ("results.csv", "table.md", "sine_fig2.png", "fit_history.png", "meta_model.safetensors"):
        assert (tmp_path / name).stat().st_size > 0


def test_bad_shots_are_refused(tmp_path):
    result = CliRunner().invoke(app, ["sine", "--shots", "1,x", "--out", str(tmp_path)])
    assert result.exit_code != 0
    assert "comma-separated integers" in result.output
