"""The figures' own arithmetic, and that they draw from a report's shapes."""

import math

from fedfuse_sim import plots


def test_gaps_are_percent_from_the_best_either_way_and_skip_unscored_candidates():
    assert plots.gaps_from_best([2.0, 1.0, 1.5, math.inf], higher_is_better=False)[:3] == [100.0, 0.0, 50.0]
    assert math.isnan(plots.gaps_from_best([2.0, 1.0, math.inf], higher_is_better=False)[2])
    assert plots.gaps_from_best([80.0, 90.0, 45.0], higher_is_better=True) == [100 * 10 / 90, 0.0, 50.0]


def test_the_choices_figure_draws_every_group_and_rings_the_choice(tmp_path):
    ridges = ["0.01", "0.001", "0.0001"]
    groups = {"the fit's simulated devices": [0.3, 0.2, math.inf], "new devices": [0.5, 0.4, 0.45],
              "held out of the fit": [0.6, 0.5, 0.4], "held out, by uploads": [0.9, 0.8, 0.85]}
    curves = {"ridge": {seed: {g: dict(zip(ridges, v)) for g, v in groups.items()} for seed in (0, 1)}}
    path = tmp_path / "choices.png"
    plots.choices_figure(path, curves, {"ridge": {0: "0.001", 1: "0.01"}}, higher_is_better=False)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
