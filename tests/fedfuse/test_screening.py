import pytest
import torch

from fedfuse.architectures import VectorSpec
from fedfuse.meta_model import MetaModel
from fedfuse.screening import screen
from fedfuse.tasks import sine
from fedfuse.zoo import ModelZoo
from fedfuse_sim.poisoning import colluders, extreme_descriptor

PROBE = torch.linspace(-5, 5, 32)[:, None]


def _poisoned(zoo: ModelZoo, n_bad: int = 6) -> ModelZoo:
    """Half scaled copies of honest models, half random nets, each claiming a real task."""
    gen = torch.Generator().manual_seed(7)
    bad = []
    for j in range(n_bad):
        if j % 2 == 0:
            w = 5.0 * zoo.weights[j]
        else:
            w = 3.0 * torch.randn(zoo.spec.num_weights, generator=gen)
        bad.append(w)
    return ModelZoo(zoo.spec, torch.cat([zoo.weights, torch.stack(bad)]),
                    torch.cat([zoo.tau, zoo.tau[:n_bad] + 0.01]),
                    zoo.ids + [f"bad-{j}" for j in range(n_bad)])


@pytest.mark.parametrize("probe", [PROBE, None])
def test_scaled_and_random_models_are_excluded(small_sine_zoo, probe):
    _, zoo = small_sine_zoo
    kept, report = screen(_poisoned(zoo), probe)
    assert sorted(report.excluded) == [f"bad-{j}" for j in range(6)]
    assert kept.ids == zoo.ids
    assert report.as_dict()["max_score"] > report.threshold


def test_an_honest_zoo_loses_nothing(small_sine_zoo):
    _, zoo = small_sine_zoo
    kept, report = screen(zoo, PROBE)
    assert report.excluded == [] and len(kept) == len(zoo)


@pytest.mark.slow
def test_poisoned_zoo_after_screening_personalizes_within_10_percent_of_clean():
    tasks = sine.sample_tasks(80, seed=11)
    zoo = ModelZoo(sine.SPEC, sine.pretrain(tasks, seed=12, points=100, steps=400), tasks.tau,
                   [f"c{i:03d}" for i in range(80)])
    test = sine.sample_tasks(30, seed=13)
    settings = dict(hidden=(128,), max_rounds=4, steps_per_round=120, seed=0)

    def zero_shot(z: ModelZoo) -> float:
        model = MetaModel(**settings).fit(z, probe=PROBE)
        return float(sine.nrmse(sine.SPEC, model.personalize(test.tau).mean, test).mean())

    clean = zero_shot(zoo)
    poisoned = _poisoned(zoo, 8)
    kept, report = screen(poisoned, PROBE)
    assert len(report.excluded) == 8
    screened = zero_shot(kept)
    assert abs(screened - clean) <= 0.1 * clean
    unscreened = zero_shot(poisoned)
    assert unscreened > screened  # what the screening saved


@pytest.mark.parametrize("kind, spread", [("flip", 0.03), ("flip", 0.3), ("phase", 0.03), ("phase", 0.3)])
def test_colluders_claiming_nearby_descriptors_cannot_vouch_for_each_other(small_sine_zoo, kind, spread):
    _, zoo = small_sine_zoo
    attacked = colluders(4, kind, spread, seed=3, steps=300).upon(zoo)  # 4 of 34: 12 %
    kept, report = screen(attacked, PROBE)
    assert sorted(report.excluded) == [f"bad-{j}" for j in range(4)]  # every colluder, no honest model
    assert kept.ids == zoo.ids


def test_an_extreme_descriptor_is_excluded_and_leaves_the_others_judged_as_before(small_sine_zoo):
    tasks, zoo = small_sine_zoo
    kept, report = screen(extreme_descriptor(tasks, zoo).upon(zoo), PROBE)
    assert report.excluded == ["bad-0"] and "robust scales per entry from every other one" in report.reasons["bad-0"]
    assert kept.ids == zoo.ids
    clean = screen(zoo, PROBE)[1].scores  # robust scales: the others' neighbourhoods barely move
    assert sorted(abs(report.scores[i] - clean[i]) for i in zoo.ids)[len(zoo) // 2] < 0.5


@pytest.mark.parametrize("length", [2, 32])
def test_the_isolation_bar_does_not_rise_with_the_descriptors_length(length):
    """Honest heavy-tailed descriptors drawn alike (as principal-component scores of sparse data
    are) are never isolated, however many entries they have (in 32 entries the Euclidean
    distances of 20 of them to their nearest neighbour pass 10 robust units); one far away is."""
    torch.manual_seed(0)
    tau = torch.distributions.StudentT(3.0).sample((300, length))
    tau[-1] += 40.0
    gen = torch.Generator().manual_seed(0)
    weights = tau @ torch.randn(length, 8, generator=gen) + 0.01 * torch.randn(300, 8, generator=gen)
    zoo = ModelZoo(VectorSpec(8), weights, tau, [f"m-{i}" for i in range(300)])
    _, report = screen(zoo)
    isolated = [i for i, why in report.reasons.items() if "from every other one" in why]
    assert isolated == ["m-299"]
