import torch

from fedfuse.adaptation import THRESHOLDS, condition_readout
from fedfuse.architectures import MLPSpec
from fedfuse.posterior import ReadoutGaussian
from fedfuse.readout import get_readout, set_readout
from fedfuse.training import loss_fn, train_networks


def _data(q=3, k=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(q, k, 2, generator=gen)
    return x, (x[..., 0] > 0).long() + (x[..., 1] > 0).long()


def _conditioning_case(k: int, seed: int = 0):
    """A readout prior whose low-rank directions contain the truth's deviation from the mean."""
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
    spec, base, prior, truth, x, y = _conditioning_case(k=12)
    grid = torch.linspace(-2, 2, 64)[:, None]
    err = lambda w: (spec.forward(w, grid) - spec.forward(truth, grid)).pow(2).mean((1, 2))  # noqa: E731
    tuned = condition_readout(spec, base, prior, x, y, "mse")
    assert (err(tuned) < 0.1 * err(base)).all()
    hidden = torch.ones(spec.num_weights, dtype=torch.bool)
    hidden[spec.readout_index.flatten()] = False
    assert torch.equal(tuned[:, hidden], base[:, hidden])  # only the readout moved


def test_conditioning_keeps_the_initializer_without_evidence():
    spec, base, prior, _, x, _ = _conditioning_case(k=12)
    assert torch.equal(condition_readout(spec, base, prior, x[:, :1], torch.zeros(4, 1, 1)), base)
    # shots the initializer already explains: no update can predict held-out shots better
    assert torch.equal(condition_readout(spec, base, prior, x, spec.forward(base, x), "mse"), base)


def test_conditioning_with_cross_entropy():
    spec = MLPSpec((2, 8, 3))
    x, y = _data(q=2, k=30)
    init = train_networks(spec, spec.init(2, torch.Generator().manual_seed(1)), x, y, steps=200, lr=1e-2, loss="ce")
    loc = get_readout(spec, init).reshape(2, -1)
    prior = ReadoutGaussian(loc, torch.zeros(2, loc.shape[1], 0), torch.ones_like(loc))
    scrambled = init.clone()
    scrambled[:, spec.readout_index.flatten()] = 0.0
    prior0 = ReadoutGaussian(torch.zeros_like(loc), prior.factor, prior.diag)
    tuned = condition_readout(spec, scrambled, prior0, x, y, "ce")
    assert (loss_fn(spec, tuned, x, y, "ce") < loss_fn(spec, scrambled, x, y, "ce")).all()


def test_a_stricter_threshold_only_keeps_more_initializers():
    """The acceptance rule: raising the required margin can only turn updates down, never
    accept one the looser rule declined; an update the rule takes is the same update (to the
    solver's tolerance)."""
    spec, base, prior, truth, x, _ = _conditioning_case(k=10, seed=3)
    y = spec.forward(truth, x) + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    taken = {t: (condition_readout(spec, base, prior, x, y, "mse", threshold=t) != base).any(1) for t in (0.0, 2.0, 50.0)}
    assert taken[0.0].any() and not taken[50.0].any()
    assert (taken[2.0] <= taken[0.0]).all()
    loose, strict = (condition_readout(spec, base, prior, x, y, "mse", threshold=t) for t in (0.0, 2.0))
    assert torch.allclose(strict[taken[2.0]], loose[taken[2.0]], atol=1e-3)  # one L-BFGS over the rows taken
    # without a threshold, the loss's default margin
    default = condition_readout(spec, base, prior, x, y, "mse")
    assert torch.equal(default, condition_readout(spec, base, prior, x, y, "mse", threshold=THRESHOLDS["mse"]))
