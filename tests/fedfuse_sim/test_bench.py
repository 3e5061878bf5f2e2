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
    assert set(s) == {"ours", "ours, distilled", "ours, Adam fine-tuning", "ours, 1-NN's features", "paper's decoder",
                      "no-align", "no-align, distilled", "cold-start", "1-NN", "k-NN aligned", "zoo average", "MAML [1-100-1]", "MAML [1-40-40-1]",
                      "MAML [1-100-1], own SGD", "MAML [1-40-40-1], own SGD"}
    assert s["ours"]["0-shot"][0] < s["1-NN"]["0-shot"][0] < s["cold-start"]["0-shot"][0]
    assert s["ours"]["0-shot"][0] < s["paper's decoder"]["0-shot"][0]
    assert len(rows) == 15 * 2 * 10  # methods x shots x test tasks
    assert "paper: MAML [1-40-40-1]" in table and "centralized" in table
    seed = summary["per_seed"]["0"]
    assert -1 <= seed["uncertainty"]["spearman"] <= 1 and set(seed["uncertainty"]["coverage"]) >= {"0.90"}
    assert set(seed["reconstruction_nrmse"]) == {"uploaded", "decoded", "decoded + own readout"}
    assert set(seed["worse_than_0shot"]) == {"10-shot"} and seed["selected"]["kernel"] in ("rbf", "rbf+linear", "overlap")
    assert set(seed["worse_than_0shot_distilled"]) == {"10-shot"}
    assert set(seed["selected"]["distill_errors"]) == {"0", "100", "300", "1000"}
    assert seed["selected"]["distill_steps"] == int(min(seed["selected"]["distill_errors"],
                                                        key=seed["selected"]["distill_errors"].get))
    size, shrink = seed["selected"]["nearby_covariance"]
    assert (size, shrink) == (0, 1.0) or (size > 0 and 0 < shrink < 1)  # the shared covariance, or nearby models shrunk towards it
    for name in ("sine_fig2.png", "fit_history.png", "uncertainty.png", "meta_model_seed0.safetensors"):
        assert (tmp_path / name).stat().st_size > 0


@pytest.mark.slow
def test_mnist_smoke(tmp_path):
    summary, rows, table = _bench(tmp_path, "mnist")
    s = summary["summary"]
    assert set(s) == {"ours", "ours, distilled", "ours, Adam fine-tuning", "paper's decoder", "no-align",
                      "no-align, distilled", "cold-start", "1-NN", "k-NN aligned", "zoo average", "MAML", "MAML, own SGD"}
    assert len(rows) == 12 * 2 * 8  # methods x shots x (2 test tasks per K, K = 2..5)
    ours = [s["ours"][f"K={k} 0-shot"][0] for k in (2, 3, 4, 5)]
    assert sum(ours) > sum(s["paper's decoder"][f"K={k} 0-shot"][0] for k in (2, 3, 4, 5))
    seed = summary["per_seed"]["0"]
    assert set(seed["reconstruction_accuracy"]) == {"uploaded", "decoded", "decoded + own readout"}
    assert (tmp_path / "uncertainty.png").stat().st_size > 0
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
    assert set(s) == {"ours", "paper's decoder", "1-NN", "k-NN average", "zoo average", "cold-start CF", "oracle CF"}
    assert {r["method"] for r in rows if r["dim"] == "20"} == set(s)
    assert s["oracle CF"]["20-dim"][0] < s["1-NN"]["20-dim"][0]
    assert s["ours"]["20-dim"][0] < s["1-NN"]["20-dim"][0]
    assert "| paper: 1-NN | 1.26 |" in table
    assert set(summary["per_seed"]["0"]["uncertainty"]) == {"20-dim"}
    for name in ("movielens_rmse.png", "uncertainty.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_settings_from_the_command_line(tmp_path):
    from fedfuse_sim.cli import _parse_settings

    assert _parse_settings(["kernel=rbf", "function_space=false", "hidden=[32, 8]", "lr=0.01"]) == {
        "kernel": "rbf", "function_space": False, "hidden": (32, 8), "lr": 0.01}
    result = CliRunner().invoke(app, ["bench", "sine", "--set", "kernel", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "key=value" in result.output


def test_bad_seeds_are_refused(tmp_path):
    result = CliRunner().invoke(app, ["bench", "sine", "--seeds", "1,x", "--out", str(tmp_path)])
    assert result.exit_code != 0
    assert "comma-separated integers" in result.output


@pytest.mark.parametrize("users", [-1, 801])
def test_movielens_zoo_size_outside_the_seen_users_is_refused(users):
    from fedfuse.datasets import load_movielens_100k
    from fedfuse_sim.movielens import MovieLensConfig, run_seed

    with pytest.raises(ValueError, match=f"zoo_users={users}: use 0 \\(all 800 seen users\\) up to 800"):
        run_seed(MovieLensConfig(zoo_users=users), 0, load_movielens_100k(), progress=False)
