"""The three benchmarks at their smoke size, through the CLI as a person runs them."""

import csv
import json

import pytest
from typer.testing import CliRunner

from fedfuse_sim.cli import app


def _bench(tmp_path, name, *args):
    result = CliRunner().invoke(app, ["bench", name, "--smoke", "--out", str(tmp_path), "--threads", "1", *args])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    table = (tmp_path / "table.md").read_text()
    return summary, rows, table


@pytest.mark.slow
def test_sine_smoke(tmp_path):
    summary, rows, table = _bench(tmp_path, "sine")
    s = summary["summary"]
    assert set(s) == {"ours", "no-align", "cold-start", "1-NN", "zoo average", "MAML [1-100-1]", "MAML [1-40-40-1]",
                      "MAML [1-100-1], own SGD", "MAML [1-40-40-1], own SGD"}
    assert s["ours"]["0-shot"][0] < s["cold-start"]["0-shot"][0]
    assert len(rows) == 9 * 2 * 10  # methods x shots x test tasks
    assert "paper: MAML [1-40-40-1]" in table and "centralized" in table
    for name in ("sine_fig2.png", "fit_history.png", "meta_model_seed0.safetensors"):
        assert (tmp_path / name).stat().st_size > 0


@pytest.mark.slow
def test_mnist_smoke(tmp_path):
    summary, rows, table = _bench(tmp_path, "mnist")
    s = summary["summary"]
    assert set(s) == {"ours", "no-align", "cold-start", "1-NN", "zoo average", "MAML", "MAML, own SGD"}
    assert len(rows) == 7 * 2 * 8  # methods x shots x (2 test tasks per K, K = 2..5)
    assert all(0 <= float(r["accuracy"]) <= 100 for r in rows)
    # one shot per digit helps a random init on average
    cold = [s["cold-start"][f"K={k} {n}-shot"][0] for k in (2, 3, 4, 5) for n in (0, 1)]
    assert sum(cold[1::2]) > sum(cold[0::2])
    assert "| paper: ours | 66.9 |" in table
    assert (tmp_path / "mnist_accuracy.png").stat().st_size > 0


@pytest.mark.slow
def test_movielens_smoke(tmp_path):
    summary, rows, table = _bench(tmp_path, "movielens")
    s = summary["summary"]
    assert set(s) == {"ours", "1-NN", "zoo average", "cold-start CF", "oracle CF"}
    assert {r["method"] for r in rows if r["dim"] == "20"} == set(s)
    assert s["oracle CF"]["20-dim"][0] < s["1-NN"]["20-dim"][0]
    assert s["ours"]["20-dim"][0] < s["1-NN"]["20-dim"][0]
    assert "| paper: 1-NN | 1.26 |" in table
    assert (tmp_path / "movielens_rmse.png").stat().st_size > 0


def test_bad_seeds_are_refused(tmp_path):
    result = CliRunner().invoke(app, ["bench", "sine", "--seeds", "1,x", "--out", str(tmp_path)])
    assert result.exit_code != 0
    assert "comma-separated integers" in result.output
