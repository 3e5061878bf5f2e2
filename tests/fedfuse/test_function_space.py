import math

import pytest
import torch

from fedfuse.function_space import FunctionSpaceGP, _k
from fedfuse.kernels import OverlapKernel, is_set_valued, make_kernel


def _smooth_zoo(n: int, seed: int, noise: float = 0.01):
    """Signatures that depend smoothly on the first descriptor entry only."""
    gen = torch.Generator().manual_seed(seed)
    tau = torch.rand(n, 2, generator=gen) * 4
    grid = torch.linspace(-3, 3, 16)
    sig = torch.sin(grid[None, :] + tau[:, :1]) * (1 + 0.3 * tau[:, :1])
    return tau, sig + noise * torch.randn(sig.shape, generator=gen)


@pytest.fixture(scope="module")
def fitted():
    tau, sig = _smooth_zoo(40, 0)
    return tau, sig, FunctionSpaceGP(kernel="rbf", steps=40).fit(tau, sig)


def test_closed_form_loo_equals_brute_force_refits(fitted):
    tau, sig, gp = fitted
    x, y = gp.x_, gp.y_
    noise = gp.log_noise_.exp()
    brute = []
    for i in range(len(x)):
        keep = torch.arange(len(x)) != i
        k = _k(gp.kernel_, x[keep], x[keep]) + (noise + 1e-8) * torch.eye(len(x) - 1, dtype=torch.float64)
        pred = _k(gp.kernel_, x[i : i + 1], x[keep]) @ torch.linalg.solve(k, y[keep])
        brute.append(y[i] - pred[0])
    assert torch.allclose(gp.loo_residuals(), torch.stack(brute), atol=1e-8)


def test_local_loo_equals_exact_when_the_neighbourhood_is_the_zoo(fitted):
    _, _, gp = fitted
    n = gp.x_.shape[0]
    local = gp._loo(gp.kernel_, gp.log_noise_, gp.x_, gp.y_, torch.arange(n))  # n - 1 neighbours each
    exact = gp._loo(gp.kernel_, gp.log_noise_, gp.x_, gp.y_, None)
    assert torch.allclose(local.residual, exact.residual, atol=1e-6)
    assert torch.allclose(local.variance, exact.variance, atol=1e-6)


def test_fitting_lowers_the_loo_error_and_finds_the_irrelevant_entry(fitted):
    tau, sig, gp = fitted
    start = FunctionSpaceGP(kernel="rbf", steps=0).fit(tau, sig)
    assert gp.candidates_["rbf"] < start.candidates_["rbf"]
    ls = gp.kernel_.lengthscale.flatten()
    assert ls[1] > 2 * ls[0]  # the signatures ignore tau[:, 1]


def test_prediction_beats_the_zoo_mean_and_nearest_neighbour_on_new_tasks(fitted):
    tau, sig, gp = fitted
    new_tau, new_sig = _smooth_zoo(30, 1, noise=0.0)
    pred = gp.predict(new_tau)
    err = (pred.mean - new_sig).pow(2).mean()
    nearest = sig[torch.cdist(new_tau, tau).argmin(1)]
    assert err < 0.5 * (nearest - new_sig).pow(2).mean()
    assert err < 0.05 * (sig.mean(0) - new_sig).pow(2).mean()


def test_band_is_calibrated_on_held_out_tasks():
    tau, sig = _smooth_zoo(120, 2, noise=0.05)
    gp = FunctionSpaceGP(kernel="rbf", steps=40).fit(tau, sig)
    new_tau, new_sig = _smooth_zoo(200, 3, noise=0.05)
    pred = gp.predict(new_tau)
    half = 1.6449 * pred.variance.sqrt()
    coverage = ((new_sig - pred.mean).abs() <= half).float().mean()
    assert 0.8 < coverage < 0.97


def test_novelty_and_expected_error_grow_far_from_the_zoo(fitted):
    _, _, gp = fitted
    pred = gp.predict(torch.tensor([[2.0, 2.0], [40.0, 2.0]]))
    assert pred.novelty[0] < 0.2 < 0.9 < pred.novelty[1] <= 1.0
    assert pred.expected_error[1] > pred.expected_error[0]


def test_state_round_trip_predicts_identically(fitted):
    _, _, gp = fitted
    tensors, meta = gp.state()
    back = FunctionSpaceGP.from_state(tensors, meta)
    q = torch.tensor([[1.0, 3.0], [0.2, 0.1]])
    a, b = gp.predict(q), back.predict(q)
    assert torch.equal(a.mean, b.mean) and torch.equal(a.variance, b.variance)
    assert torch.equal(a.expected_error, b.expected_error)


def test_local_prediction_for_large_zoos_tracks_the_exact_one():
    tau, sig = _smooth_zoo(300, 4)
    exact = FunctionSpaceGP(kernel="rbf", steps=20).fit(tau, sig)
    local = FunctionSpaceGP(kernel="rbf", steps=20, exact_fit=100, max_exact=100, neighbours=64,
                            anchors=128).fit(tau, sig)
    assert local.local and not exact.local
    q, truth = _smooth_zoo(50, 5, noise=0.0)
    e_exact = (exact.predict(q).mean - truth).pow(2).mean()
    e_local = (local.predict(q).mean - truth).pow(2).mean()
    assert e_local < 2 * e_exact + 1e-4


def test_overlap_kernel_is_a_function_of_overlap_and_positive_definite():
    sets = torch.tensor([[1.0, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1], [1, 0, 0, 1], [1, 1, 1, 0]])
    kernel = OverlapKernel().double()
    with torch.no_grad():
        kernel.lengthscale = 1.0
        k = kernel(sets.double(), sets.double()).to_dense()
    assert torch.allclose(torch.diagonal(k), torch.ones(5, dtype=torch.float64))
    assert math.isclose(float(k[0, 1]), math.exp(-(1 - 0.5)), rel_tol=1e-9)  # one shared of two each
    assert torch.linalg.eigvalsh(k).min() > 0
    assert is_set_valued(sets) and not is_set_valued(sets - 0.5)


def test_auto_tries_overlap_only_for_set_valued_descriptors():
    tau, sig = _smooth_zoo(20, 6)
    assert "overlap" not in FunctionSpaceGP(steps=5).fit(tau - 2, sig).candidates_
    assert "overlap" in FunctionSpaceGP(steps=5).fit(tau, sig).candidates_
    with pytest.raises(ValueError, match="unknown kernel"):
        make_kernel("cosine", 2)


def _regional_zoo(n: int, seed: int, regional: bool):
    """A smooth zoo whose models err along one direction on the left of the descriptor range and
    another on the right (``regional``), or isotropically."""
    gen = torch.Generator().manual_seed(seed)
    tau = torch.rand(n, 1, generator=gen) * 4
    grid = torch.linspace(-3, 3, 16)
    sig = torch.sin(grid[None, :] + tau)
    if regional:
        left, right = torch.sin(2 * grid), torch.cos(3 * grid)
        direction = torch.where(tau < 2, left[None, :], right[None, :])
        return tau, sig + 0.05 * torch.randn(n, 1, generator=gen) * direction
    return tau, sig + 0.05 * torch.randn(sig.shape, generator=gen)


def test_nearby_covariance_is_chosen_where_models_err_alike_by_region():
    regional = FunctionSpaceGP(kernel="rbf", steps=20).fit(*_regional_zoo(120, 0, regional=True))
    assert regional.nearby_size_ > 0 and regional.nearby_shrink_ < 1
    pred = regional.predict(torch.tensor([[0.5], [3.5]]))
    assert pred.nearby.shape == (2, regional.nearby_size_, 16)
    isotropic = FunctionSpaceGP(kernel="rbf", steps=20).fit(*_regional_zoo(120, 0, regional=False))
    assert (isotropic.nearby_size_, isotropic.nearby_shrink_) == (0, 1.0)
    assert isotropic.predict(torch.tensor([[0.5]])).nearby is None


def test_nearby_rows_point_along_the_region_s_own_error():
    gp = FunctionSpaceGP(kernel="rbf", steps=20).fit(*_regional_zoo(120, 0, regional=True))
    grid = torch.linspace(-3, 3, 16)
    left = torch.sin(2 * grid) / torch.sin(2 * grid).norm()
    rows = gp.predict(torch.tensor([[0.5], [3.5]])).factor()  # (2, s + r, 16)
    along = [(r @ left).pow(2).sum() / r.pow(2).sum() for r in rows]
    assert along[0] > 0.5 > along[1]


def test_prediction_factor_and_variance_agree(fitted):
    gp = FunctionSpaceGP(kernel="rbf", steps=20).fit(*_regional_zoo(120, 0, regional=True))
    for model in (gp, fitted[2]):
        pred = model.predict(torch.tensor([[1.0, 3.0], [0.2, 0.1]])[:, : model.x_.shape[1]])
        direct = pred.factor().pow(2).sum(1) + pred.scale[:, None] ** 2 * pred.residual
        assert torch.allclose(pred.variance, direct, rtol=1e-5)


def test_loo_predictions_never_use_the_model_s_own_residual():
    gp = FunctionSpaceGP(kernel="rbf", steps=20).fit(*_regional_zoo(120, 0, regional=True))
    index = torch.arange(0, 120, 7)
    loo = gp.loo_predictions(index)
    scale = math.sqrt((1 - gp.nearby_shrink_) / gp.nearby_size_)
    for row, i in zip(loo.nearby, index.tolist()):
        own = (gp.nearby_residuals_[i] * scale).float()
        assert not any(torch.allclose(r, own) for r in row)
    assert torch.allclose(loo.mean.double(), gp.y_[index] - gp.loo_residuals()[index] + gp.mu_, atol=1e-5)


def test_state_round_trip_keeps_the_nearby_covariance_and_older_fits_keep_the_shared_one():
    gp = FunctionSpaceGP(kernel="rbf", steps=20).fit(*_regional_zoo(120, 0, regional=True))
    tensors, meta = gp.state()
    q = torch.tensor([[0.5], [3.5]])
    back = FunctionSpaceGP.from_state(tensors, meta).predict(q)
    assert torch.equal(back.factor(), gp.predict(q).factor())
    older = {k: v for k, v in tensors.items() if k != "nearby_residuals"}
    old = FunctionSpaceGP.from_state(older, {k: v for k, v in meta.items() if k != "nearby"}).predict(q)
    assert old.nearby is None and torch.equal(old.basis, gp.basis_.float())


def test_the_served_covariance_is_the_scored_mixture_of_nearby_residuals_and_the_shared_one():
    gp = FunctionSpaceGP(kernel="rbf", steps=20).fit(*_regional_zoo(120, 0, regional=True))
    size, lam = gp.nearby_size_, gp.nearby_shrink_
    tau = torch.tensor([[0.5], [2.2], [3.5]])
    pred = gp.predict(tau)
    f = pred.factor().double()
    served = f.transpose(1, 2) @ f + torch.diag_embed(pred.scale.double()[:, None] ** 2 * pred.residual.double())
    pts = gp._metric(gp.x_[gp.loo_index_])
    near = torch.cdist(gp._metric(gp._inputs(tau)), pts).topk(size, largest=False).indices
    z = gp.nearby_residuals_.double()[near]  # (3, size, 16)
    shared = gp.basis_.T @ gp.basis_ + torch.diag(gp.residual_)
    expected = pred.scale.double()[:, None, None] ** 2 * ((1 - lam) * z.transpose(1, 2) @ z / size + lam * shared)
    assert torch.allclose(served, expected, rtol=1e-4, atol=1e-7)  # full matrices, after the compression


def test_nearby_covariance_on_zoos_beyond_the_scored_subset_and_in_local_mode():
    tau, sig = _regional_zoo(300, 1, regional=True)
    exact = FunctionSpaceGP(kernel="rbf", steps=10).fit(tau, sig)  # 300 LOO models, 256 of them scored
    assert exact.nearby_size_ > 0
    local = FunctionSpaceGP(kernel="rbf", steps=10, exact_fit=100, max_exact=100, anchors=128).fit(tau, sig)
    assert local.local and len(local.loo_index_) == 128
    loo = local.loo_predictions(torch.arange(300))  # anchors and the rest alike
    assert loo.mean.shape == (300, 16)
    if local.nearby_size_:
        scale = math.sqrt((1 - local.nearby_shrink_) / local.nearby_size_)
        for j, i in enumerate(local.loo_index_.tolist()):  # an anchor never sees its own residual
            own = local.nearby_residuals_[j] * scale
            assert not any(torch.allclose(r, own) for r in loo.nearby[i])
