import pytest
import torch
from scipy import stats
from torch import Tensor

from fedfuse.adaptation import (RULES, Acceptance, CrossValidation, _gaussian_solve, _map_readout, _posterior_readout,
                                _shot_covariance, condition_readout, cross_validate, shot_misfit)
from fedfuse.architectures import MLPSpec
from fedfuse.posterior import ReadoutGaussian
from fedfuse.readout import get_readout, set_readout
from fedfuse.training import loss_fn, train_networks


def _gaussian_map(phi: Tensor, prior: ReadoutGaussian, y: Tensor, noise: Tensor) -> Tensor:
    """The exact MAP readouts solved from scratch on the shots given: a refit, as brute force."""
    q, _, h1 = phi.shape
    residual = (y.double() - phi.double() @ prior.loc.double().reshape(q, h1, -1)).reshape(q, -1)
    return _posterior_readout(phi, prior, _gaussian_solve(_shot_covariance(phi, prior), residual, noise)[1])


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
    solves' rounding: the rows taken are solved together)."""
    spec, base, prior, truth, x, _ = _conditioning_case(k=10, seed=3)
    y = spec.forward(truth, x) + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    rule = lambda t: Acceptance(t)  # noqa: E731
    taken = {t: (condition_readout(spec, base, prior, x, y, "mse", rule=rule(t)) != base).any(1) for t in (0.0, 2.0, 50.0)}
    assert taken[0.0].any() and not taken[50.0].any()
    assert (taken[2.0] <= taken[0.0]).all()
    loose, strict = (condition_readout(spec, base, prior, x, y, "mse", rule=rule(t)) for t in (0.0, 2.0))
    assert torch.allclose(strict[taken[2.0]], loose[taken[2.0]], atol=1e-5)  # the same exact solve, batched differently
    # without a rule, the default of the loss and of the path that made the initializer
    for distilled in (False, True):
        default = condition_readout(spec, base, prior, x, y, "mse", distilled=distilled)
        assert torch.equal(default, condition_readout(spec, base, prior, x, y, "mse", rule=RULES["mse", distilled]))


def test_the_margin_is_students_t_at_the_normal_level():
    for t in (1.0, 2.0, 3.0):
        for k in (2, 3, 10, 40):
            assert abs(Acceptance(t).margin(k) - stats.t.ppf(stats.norm.cdf(t), k - 1)) < 1e-9
        assert abs(Acceptance(t).margin(10**6) - t) < 1e-4  # many shots: the normal margin
    assert abs(Acceptance(8.0).margin(5) - stats.t.isf(stats.norm.sf(8.0), 4)) < 1e-6 * 8333  # no rounding of the tail
    assert Acceptance(50.0).margin(5) == float("inf")
    assert Acceptance(0.0).margin(3) == 0.0 and Acceptance(-1e9).margin(3) == -1e9


def _judged(gains: list[float]) -> CrossValidation:
    """One device whose held-out shots gain exactly ``gains`` in squared error over its
    initializer (which errs by 1 on every shot), under one strength."""
    spec = MLPSpec((1, 4, 1))
    mean = spec.init(1, torch.Generator().manual_seed(0))
    k = len(gains)
    loc = get_readout(spec, mean).reshape(1, -1)
    prior = ReadoutGaussian(loc, torch.zeros(1, loc.shape[1], 1), torch.ones_like(loc))
    held = (1.0 + torch.tensor(gains)).sqrt()[None, None, :, None]
    return CrossValidation(spec, mean, prior, torch.ones(1, k, loc.shape[1]), torch.zeros(1, k, 1), "mse", (1.0,),
                           torch.ones(1), torch.ones(1, k, 1), held, torch.ones(1, 1, k, dtype=torch.float64), 100)


def test_few_held_out_shots_need_a_larger_margin():
    """Three held-out shots gaining 2.6 standard errors clear one standard error but not two
    (Student's 4.53 at 3 shots, where a normal margin of 2 would take them); the same gains
    over twelve shots clear two."""
    few = _judged([-1.0, -0.2, -0.6])
    assert torch.equal(few.conditioned(Acceptance(2.0)), few.mean)
    assert not torch.equal(few.conditioned(Acceptance(1.0)), few.mean)
    many = _judged([-1.0, -0.2, -0.6] * 4)
    assert not torch.equal(many.conditioned(Acceptance(2.0)), many.mean)


def test_a_device_whose_initializer_misses_its_shots_judges_updates_at_the_misfit_threshold():
    """The misfit is the RMS error over the shots' range; at or past ``misfit_cut`` the margin is
    ``misfit_threshold``'s. Three held-out shots that clear one standard error but not two: an
    initializer that misses its shots takes the update under a misfit threshold of 1, one that
    fits them (a cut it does not reach) keeps the initializer."""
    pred, y = torch.tensor([[[0.1], [2.1]], [[1.0], [1.0]]]), torch.tensor([[[0.0], [2.0]], [[0.0], [2.0]]])
    assert torch.allclose(shot_misfit(pred, y), torch.tensor([0.05, 0.5]))
    rule = Acceptance(2.0, misfit_cut=0.05, misfit_threshold=1.0)
    assert rule.margins(10, torch.tensor([0.049, 0.05, 0.2])).tolist() == pytest.approx(
        [Acceptance(2.0).margin(10), Acceptance(1.0).margin(10), Acceptance(1.0).margin(10)], rel=1e-6)
    assert Acceptance(2.0).margins(10, torch.tensor([0.0, 9.0])).tolist() == pytest.approx([Acceptance(2.0).margin(10)] * 2)
    few = _judged([-1.0, -0.2, -0.6])  # its initializer errs by 1 on shots that are all 0: it misses them
    assert not torch.equal(few.conditioned(rule), few.mean)
    assert torch.equal(few.conditioned(Acceptance(2.0, misfit_cut=float("inf"), misfit_threshold=1.0)), few.mean)


def test_absolute_errors_see_an_update_that_one_large_squared_error_hides():
    """Nine held-out shots improve and one gets worse. In squared error that one shot dominates
    the spread, and the paired test keeps the initializer (0.5 standard errors); judged by
    absolute error the same update clears one standard error (1.15 against Student's 1.06)."""
    cv = _judged([-0.36] * 9 + [2.0])
    assert torch.equal(cv.conditioned(Acceptance(1.0)), cv.mean)
    assert not torch.equal(cv.conditioned(Acceptance(1.0, absolute=True)), cv.mean)


def _noisy_case():
    spec, base, prior, truth, x, _ = _conditioning_case(k=10, seed=3)
    y = spec.forward(truth, x) + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    return spec, base, prior, x, y


def test_a_shrunk_update_is_that_share_of_the_way_to_the_map_readout():
    spec, base, prior, x, y = _noisy_case()
    cv = cross_validate(spec, base, prior, x, y, "mse", strengths=(1.0,))
    always = -1e9  # every update clears this margin
    full, half = (get_readout(spec, cv.conditioned(Acceptance(always, a))) for a in (1.0, 0.5))
    start = get_readout(spec, base)
    assert not torch.allclose(full, start)
    torch.testing.assert_close(half, start + 0.5 * (full - start), atol=1e-6, rtol=0)


def test_any_strength_takes_every_update_the_best_strength_takes_and_maybe_more():
    """Considering every strength that clears the margin can only add updates; where the
    cross-validation's best strength clears it, both rules take the same update."""
    spec, base, prior, x, y = _noisy_case()
    cv = cross_validate(spec, base, prior, x, y, "mse")
    for t in (0.0, 1.0, 2.0):
        best, any_ = (cv.conditioned(Acceptance(t, 0.7, any_s)) for any_s in (False, True))
        taken_best, taken_any = (best != base).any(1), (any_ != base).any(1)
        assert (taken_best <= taken_any).all()
        assert torch.allclose(best[taken_best], any_[taken_best], atol=1e-5)  # the same exact solve
    assert (cv.conditioned(Acceptance(0.0, 0.7, True)) != base).any()


def test_squared_error_cross_validation_equals_refits_without_each_fold():
    """The exact algebra (one solve per strength) against brute force: the MAP readout solved
    again on each fold's kept shots alone, predicting the held-out ones; and the full MAP
    against the L-BFGS fit of the same objective."""
    spec, base, prior, x, y = _noisy_case()
    k, c = x.shape[1], 0.3
    for folds in (5, None):
        cv = cross_validate(spec, base, prior, x, y, "mse", strengths=(c,), folds=folds)
        parts = k if folds is None else folds
        for f in range(parts):
            held = torch.arange(k) % parts == f
            refit = _gaussian_map(cv.phi[:, ~held], prior, y[:, ~held], c * cv.unit / 2)
            pred = cv.phi[:, held] @ refit.reshape(4, -1, 1)
            torch.testing.assert_close(cv.held_out[0][:, held], pred, atol=1e-5, rtol=1e-4)
    exact = _gaussian_map(cv.phi, prior, y, c * cv.unit / 2)
    lbfgs = _map_readout(cv.phi, prior, y, torch.ones(4, k), "mse", c * cv.unit, max_iter=500)
    torch.testing.assert_close(exact, lbfgs, atol=1e-3, rtol=1e-3)


def test_two_outputs_match_the_weight_space_solve():
    """Readout entries ordered hidden unit by output: the exact MAP and every fold's held-out
    prediction against the posterior mean solved in weight space, shot by shot and output by output."""
    out, q, k = 2, 3, 9
    spec = MLPSpec((1, 8, out))
    gen = torch.Generator().manual_seed(1)
    base = spec.init(q, gen)
    loc = get_readout(spec, base).reshape(q, -1)
    cov = torch.randn(q, loc.shape[1], 4, generator=gen) * 0.5
    prior = ReadoutGaussian(loc, cov, torch.rand(q, loc.shape[1], generator=gen) * 0.3 + 0.01)
    x, y = torch.rand(q, k, 1, generator=gen) * 4 - 2, torch.randn(q, k, out, generator=gen)
    cv = cross_validate(spec, base, prior, x, y, "mse", strengths=(1.0,), folds=3)
    noise = (cv.unit / 2).double()
    phi = cv.phi.double()
    design_ = torch.einsum("qkh,cd->qkchd", phi, torch.eye(out, dtype=torch.float64)).reshape(q, k * out, -1)
    sigma = cov.double() @ cov.double().transpose(1, 2) + torch.diag_embed(prior.diag.double())

    def solve(keep: Tensor) -> Tensor:
        rows = keep.repeat_interleave(out)
        d, r = design_[:, rows], y.double().reshape(q, -1)[:, rows] - (design_[:, rows] @ loc.double()[..., None])[..., 0]
        a = torch.linalg.inv(sigma) + d.transpose(1, 2) @ d / noise[:, None, None]
        return loc.double() + torch.linalg.solve(a, (d.transpose(1, 2) @ r[..., None])[..., 0] / noise[:, None])

    torch.testing.assert_close(_gaussian_map(cv.phi, prior, y, cv.unit / 2).double(), solve(torch.ones(k, dtype=torch.bool)),
                               atol=1e-5, rtol=1e-4)
    for f in range(3):
        held = torch.arange(k) % 3 == f
        pred = (design_ @ solve(~held)[..., None])[..., 0].reshape(q, k, out)[:, held]
        torch.testing.assert_close(cv.held_out[0][:, held].double(), pred, atol=1e-5, rtol=1e-4)


def test_a_device_with_non_finite_shots_keeps_its_initializer_and_spares_the_others():
    spec, base, prior, x, y = _noisy_case()
    for rule in (Acceptance(0.0), Acceptance(0.0, absolute=True), RULES["mse", False], RULES["mse", True]):
        ref = condition_readout(spec, base, prior, x, y, "mse", rule=rule)
        for bad_x in (True, False):
            for bad in (float("nan"), float("inf")):
                xx, yy = x.clone(), y.clone()
                (xx if bad_x else yy)[0, 3] = bad
                got = condition_readout(spec, base, prior, xx, yy, "mse", rule=rule)
                assert torch.equal(got[0], base[0])
                torch.testing.assert_close(got[1:], ref[1:])
    # an update the device would take with finite shots
    assert (condition_readout(spec, base, prior, x, y, "mse", rule=Acceptance(0.0))[0] != base[0]).any()
