"""Colluders and an extreme descriptor against the fit: after screening, 0-shot quality stays
within 10 % of the honest-only fit on all test tasks and on those nearest the attack."""

import pytest

from fedfuse.tasks import sine
from fedfuse_sim.poisoning import colluders, evaluate, extreme_descriptor, honest_zoo, zero_shot


@pytest.mark.slow
def test_screening_keeps_0_shot_within_10_percent_of_the_honest_fit():
    tasks, zoo = honest_zoo(60, seed=11, steps=400)
    test = sine.sample_tasks(30, seed=13 + sine.TEST_SEED_OFFSET)
    honest = zero_shot(zoo, test)
    for attack in (colluders(6, "flip", 0.05, seed=5, steps=400), colluders(6, "phase", 0.05, seed=5, steps=400),
                   extreme_descriptor(tasks, zoo)):
        row = evaluate(zoo, attack, test, honest, near=8, unscreened=False)  # benchmarks/poisoning.py: the damage
        assert row["caught"] == row["attackers"] and row["false_positives"] <= 1, row
        assert row["all"][1] <= 1.1 * row["all"][0] and row["nearest"][1] <= 1.1 * row["nearest"][0], row
