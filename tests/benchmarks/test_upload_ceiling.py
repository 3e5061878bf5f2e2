"""The MNIST uploads' combined accuracy: the class-subset coupling on cases with a known answer,
and the report at smoke size."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "upload_ceiling.py"
spec = importlib.util.spec_from_file_location("upload_ceiling", SCRIPT)
upload_ceiling = importlib.util.module_from_spec(spec)
spec.loader.exec_module(upload_ceiling)


def _subset_models(g: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` models that each see 2-5 classes of the log-odds ``g`` (N, 10), shifted per image,
    with garbage outside their classes."""
    gen = torch.Generator().manual_seed(seed)
    classes = torch.zeros(n, 10, dtype=torch.bool)
    for i in range(n):
        classes[i, torch.randperm(10, generator=gen)[: 2 + i % 4]] = True
    shift = 5 * torch.randn(n, g.shape[0], 1, generator=gen)
    garbage = 50 * torch.randn(n, *g.shape, generator=gen)
    return torch.where(classes[:, None], g + shift, garbage), classes


def test_coupling_recovers_the_log_odds_every_model_saw_a_part_of():
    g = torch.randn(7, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    logits, classes = _subset_models(g, 30, seed=1)
    got = upload_ceiling.coupled_logits(logits, classes, torch.ones(30))
    torch.testing.assert_close(got, g - g.mean(1, keepdim=True))


def test_a_model_weighted_zero_changes_nothing():
    g = torch.randn(5, 10, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    logits, classes = _subset_models(g, 30, seed=3)
    logits[0] = torch.where(classes[0], -3 * g, logits[0])  # a model that has the classes backwards
    weight = torch.ones(30)
    assert not torch.allclose(upload_ceiling.coupled_logits(logits, classes, weight), g - g.mean(1, keepdim=True))
    weight[0] = 0.0
    torch.testing.assert_close(upload_ceiling.coupled_logits(logits, classes, weight), g - g.mean(1, keepdim=True))


def test_a_weight_of_two_counts_as_the_model_twice():
    """Models that disagree (no common log-odds), so the weights decide the answer."""
    gen = torch.Generator().manual_seed(4)
    _, classes = _subset_models(torch.zeros(3, 10, dtype=torch.float64), 30, seed=5)  # every digit linked
    logits = torch.randn(30, 3, 10, generator=gen, dtype=torch.float64)
    weight = 0.5 + torch.rand(30, generator=gen, dtype=torch.float64)
    got = upload_ceiling.coupled_logits(logits, classes, weight)
    twice = upload_ceiling.coupled_logits(torch.cat([logits, logits[:1]]), torch.cat([classes, classes[:1]]),
                                          torch.cat([weight[:1] / 2, weight[1:], weight[:1] / 2]))
    torch.testing.assert_close(got, twice)
    assert not torch.allclose(got, upload_ceiling.coupled_logits(logits, classes, torch.ones(30)))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_report_scores_every_k(tmp_path):
    res = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--smoke", "--seeds", "0"],
                         capture_output=True, text=True, timeout=280)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads((tmp_path / "upload_ceiling.json").read_text())["rows"]
    kinds = {r["kind"] for r in rows}
    assert kinds == {"uploads on their own tasks"} | {f"coupled uploads, {w}" for w in upload_ceiling.WEIGHTINGS}
    assert {(r["kind"], r["K"]) for r in rows} == {(k, K) for k in kinds for K in (2, 3, 4, 5)}
    assert all(0 <= r["accuracy"] <= 100 for r in rows)
    # the coupled uploads are far better than chance (1/K) on the smoke zoo's unseen tasks
    assert all(r["accuracy"] > 100 / r["K"] + 30 for r in rows if r["kind"].startswith("coupled"))
    table = (tmp_path / "upload_ceiling.md").read_text().splitlines()
    assert table[0].startswith("| | K=2") and len(table) == 2 + len(kinds)
