import math

import torch

from fedfuse.training import train_networks
from fedfuse.tasks import sine


def test_domains_are_balanced_and_in_range():
    t = sine.sample_tasks(200, seed=0)
    assert torch.bincount(t.domain).tolist() == [40] * 5
    k = t.domain.double()
    assert ((t.a >= 0.1 + 0.98 * k - 1e-6) & (t.a <= 0.1 + 0.98 * (k + 1) + 1e-6)).all()
    assert ((t.b >= k * math.pi / 5 - 1e-6) & (t.b <= (k + 1) * math.pi / 5 + 1e-6)).all()
    assert t.tau.shape == (200, 2)


def test_zero_predictor_scores_0_354():
    t = sine.sample_tasks(50, seed=1)
    score = sine.nrmse(sine.SPEC, torch.zeros(50, 301), t)
    # exact value on a finite grid depends on the phase; the mean sits at 1 / (2 sqrt 2)
    assert abs(score.mean().item() - 1 / (2 * math.sqrt(2))) < 0.01


def test_pretraining_fits_each_task_from_its_own_init():
    t = sine.sample_tasks(5, seed=2)
    w = sine.pretrain(t, seed=3, points=100, steps=300)
    assert sine.nrmse(sine.SPEC, w, t).mean() < 0.1
    assert not torch.allclose(w[0], w[1])


def test_finetuning_reduces_the_loss_and_zero_shots_change_nothing():
    t = sine.sample_tasks(4, seed=4)
    init = sine.SPEC.init(4, torch.Generator().manual_seed(0))
    x = sine.sample_x(4, 20, seed=5)
    tuned = train_networks(sine.SPEC, init, x, t(x), steps=100, lr=1e-2)
    before = ((sine.SPEC.forward(init, x) - t(x)) ** 2).mean()
    after = ((sine.SPEC.forward(tuned, x) - t(x)) ** 2).mean()
    assert after < 0.5 * before
    assert torch.equal(train_networks(sine.SPEC, init, x[:, :0], t(x)[:, :0]), init)
