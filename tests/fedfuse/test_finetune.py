import pytest
import torch

from fedfuse.finetune import finetune, loss_fn
from fedfuse.architectures import MLPSpec

SPEC = MLPSpec((2, 8, 3))


def _data(q=3, k=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(q, k, 2, generator=gen)
    return x, (x[..., 0] > 0).long() + (x[..., 1] > 0).long()


def test_batched_networks_train_independently():
    x, y = _data()
    init = SPEC.init(3, torch.Generator().manual_seed(1))
    together = finetune(SPEC, init, x, y, steps=30, lr=1e-2, loss="ce")
    alone = finetune(SPEC, init[1:2], x[1:2], y[1:2], steps=30, lr=1e-2, loss="ce")
    assert torch.allclose(together[1], alone[0], atol=1e-6)
    assert (loss_fn(SPEC, together, x, y, "ce") < loss_fn(SPEC, init, x, y, "ce")).all()


def test_minibatches_are_seeded_and_still_learn():
    x, y = _data()
    init = SPEC.init(3, torch.Generator().manual_seed(1))
    full = finetune(SPEC, init, x, y, steps=50, lr=1e-2, loss="ce", batch_size=40)
    assert torch.equal(full, finetune(SPEC, init, x, y, steps=50, lr=1e-2, loss="ce"))
    mini = finetune(SPEC, init, x, y, steps=50, lr=1e-2, loss="ce", batch_size=10, seed=3)
    assert torch.equal(mini, finetune(SPEC, init, x, y, steps=50, lr=1e-2, loss="ce", batch_size=10, seed=3))
    assert not torch.equal(mini, full)
    assert (loss_fn(SPEC, mini, x, y, "ce") < loss_fn(SPEC, init, x, y, "ce")).all()
    # regression targets are sliced along the example axis too
    mse = finetune(SPEC, init, x, torch.randn(3, 40, 3), steps=5, batch_size=10)
    assert mse.shape == init.shape


def test_zero_shots_return_the_initializer_and_bad_loss_is_refused():
    init = SPEC.init(2)
    assert torch.equal(finetune(SPEC, init, torch.zeros(2, 0, 2), torch.zeros(2, 0, 3)), init)
    with pytest.raises(ValueError, match="unknown loss"):
        finetune(SPEC, init, torch.zeros(2, 4, 2), torch.zeros(2, 4, 3), loss="hinge")


def _conditioning_case(k: int, seed: int = 0):
    """A readout prior whose low-rank directions contain the truth's deviation from the mean."""
    from fedfuse.posterior import ReadoutGaussian
    from fedfuse.readout import get_readout, set_readout

    spec = MLPSpec((1, 16, 1))
    gen = torch.Generator().manual_seed(seed)
    base = spec.init(4, gen)
    loc = get_readout(spec, base).reshape(4, -1)
    direction = torch.randn(4, loc.shape[1], 1, generator=gen)
    truth = set_readout(spec, base, (loc + 2.0 * direction[..., 0]).reshape(4, -1, 1))
    prior = ReadoutGaussian(loc, direction, torch.full_like(loc, 1e-4))
    x = torch.rand(4, k, 1, generator=gen) * 4 - 2
    return spec, base, prior, truth, x, spec.forward(truth, x)


def test_conditioning_moves_the_readout_towards_the_truth_along_the_prior():
    from fedfuse.finetune import condition_readout

    spec, base, prior, truth, x, y = _conditioning_case(k=12)
    grid = torch.linspace(-2, 2, 64)[:, None]
    err = lambda w: (spec.forward(w, grid) - spec.forward(truth, grid)).pow(2).mean((1, 2))  # noqa: E731
    tuned = condition_readout(spec, base, prior, x, y, "mse")
    assert (err(tuned) < 0.1 * err(base)).all()
    hidden = torch.ones(spec.num_weights, dtype=torch.bool)
    hidden[spec.readout_index.flatten()] = False
    assert torch.equal(tuned[:, hidden], base[:, hidden])  # only the readout moved


def test_conditioning_keeps_the_initializer_without_evidence():
    from fedfuse.finetune import condition_readout

    spec, base, prior, _, x, _ = _conditioning_case(k=12)
    assert torch.equal(condition_readout(spec, base, prior, x[:, :1], torch.zeros(4, 1, 1)), base)
    # shots the initializer already explains: no update can predict held-out shots better
    assert torch.equal(condition_readout(spec, base, prior, x, spec.forward(base, x), "mse"), base)


def test_conditioning_with_cross_entropy():
    from fedfuse.finetune import condition_readout
    from fedfuse.posterior import ReadoutGaussian
    from fedfuse.readout import get_readout

    spec = MLPSpec((2, 8, 3))
    x, y = _data(q=2, k=30)
    init = finetune(spec, spec.init(2, torch.Generator().manual_seed(1)), x, y, steps=200, lr=1e-2, loss="ce")
    loc = get_readout(spec, init).reshape(2, -1)
    prior = ReadoutGaussian(loc, torch.zeros(2, loc.shape[1], 0), torch.ones_like(loc))
    scrambled = init.clone()
    scrambled[:, spec.readout_index.flatten()] = 0.0
    prior0 = ReadoutGaussian(torch.zeros_like(loc), prior.factor, prior.diag)
    tuned = condition_readout(spec, scrambled, prior0, x, y, "ce")
    assert (loss_fn(spec, tuned, x, y, "ce") < loss_fn(spec, scrambled, x, y, "ce")).all()
