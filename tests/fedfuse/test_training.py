import pytest
import torch

from fedfuse.training import loss_fn, train_networks
from fedfuse.architectures import MLPSpec

SPEC = MLPSpec((2, 8, 3))


def _data(q=3, k=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(q, k, 2, generator=gen)
    return x, (x[..., 0] > 0).long() + (x[..., 1] > 0).long()


def test_batched_networks_train_independently():
    x, y = _data()
    init = SPEC.init(3, torch.Generator().manual_seed(1))
    together = train_networks(SPEC, init, x, y, steps=30, lr=1e-2, loss="ce")
    alone = train_networks(SPEC, init[1:2], x[1:2], y[1:2], steps=30, lr=1e-2, loss="ce")
    assert torch.allclose(together[1], alone[0], atol=1e-6)
    assert (loss_fn(SPEC, together, x, y, "ce") < loss_fn(SPEC, init, x, y, "ce")).all()


def test_minibatches_are_seeded_and_still_learn():
    x, y = _data()
    init = SPEC.init(3, torch.Generator().manual_seed(1))
    full = train_networks(SPEC, init, x, y, steps=50, lr=1e-2, loss="ce", batch_size=40)
    assert torch.equal(full, train_networks(SPEC, init, x, y, steps=50, lr=1e-2, loss="ce"))
    mini = train_networks(SPEC, init, x, y, steps=50, lr=1e-2, loss="ce", batch_size=10, seed=3)
    assert torch.equal(mini, train_networks(SPEC, init, x, y, steps=50, lr=1e-2, loss="ce", batch_size=10, seed=3))
    assert not torch.equal(mini, full)
    assert (loss_fn(SPEC, mini, x, y, "ce") < loss_fn(SPEC, init, x, y, "ce")).all()
    # regression targets are sliced along the example axis too
    mse = train_networks(SPEC, init, x, torch.randn(3, 40, 3), steps=5, batch_size=10)
    assert mse.shape == init.shape


def test_zero_shots_return_the_initializer_and_bad_loss_is_refused():
    init = SPEC.init(2)
    assert torch.equal(train_networks(SPEC, init, torch.zeros(2, 0, 2), torch.zeros(2, 0, 3)), init)
    with pytest.raises(ValueError, match="unknown loss"):
        train_networks(SPEC, init, torch.zeros(2, 4, 2), torch.zeros(2, 4, 3), loss="hinge")
