"""Every registered task family, and a user's own, through Flower's simulation at smoke size:
the same server and device apps, nothing family-specific in them."""

import math

import pytest
from flwr.simulation import run_simulation

from fedfuse.fitter import DISTILL_STEPS
from fedfuse.tasks import get_family
from fedfuse_client.client_app import build_client_app
from fedfuse_server.server_app import build_server_app
from fedfuse_server.store import ModelStore

NUM_CLIENTS, NUM_NEW = 6, 2
SMOKE = dict(num_clients=NUM_CLIENTS, num_new=NUM_NEW, fit_rounds=2, fit_steps=30, wait_for_nodes=60,
             parallel="serial", finetune_steps=30)
FAMILIES = {  # family: (overrides, whether ours beats a cold start at 0 shots even at this size)
    "mnist": (dict(train_steps=60, shots=2), True),
    "mnist-cnn": (dict(train_steps=60, shots=2, distill_steps=20), False),  # its choice: 2 of 2.5 minutes
    "movielens": (dict(shots=5), False),
    "bump_family:BumpFamily": (dict(train_steps=300, shots=8), True),
    "bump_family.steps:StepFamily": (dict(train_steps=300, shots=8), False),
    "bump_family.waves:WaveFamily": (dict(train_steps=300, shots=8), False),  # two inputs
}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_family_runs_collect_fit_personalize_through_flower(family, tmp_path):
    overrides, beats_cold = FAMILIES[family]
    settings = {**SMOKE, **overrides, "family": family, "store": str(tmp_path / "store")}
    run_simulation(build_server_app(**settings), build_client_app(**settings), num_supernodes=NUM_CLIENTS + NUM_NEW,
                   backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"address": "local", "num_cpus": 2}})
    store = ModelStore(tmp_path / "store")
    assert len(store.ids()) == NUM_CLIENTS
    model = store.load_meta_model()
    assert model.spec_ == get_family(family).arch and model.annotations_["family"] == family
    given = overrides.get("distill_steps")  # the run config's count is none of those the fit chooses from
    assert (model.distill_steps_ == given) if given is not None else (model.distill_steps_ in DISTILL_STEPS)
    metrics = store.metrics()
    assert len(metrics) == NUM_NEW
    assert all(math.isfinite(v) for m in metrics.values() for v in m.values())
    if beats_cold:
        better = get_family(family).score.higher_is_better
        ours = sum(m["score-0shot"] for m in metrics.values())
        cold = sum(m["cold-score-0shot"] for m in metrics.values())
        assert (ours > cold) if better else (ours < cold)
