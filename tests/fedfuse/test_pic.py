import torch

from fedfuse.pic import SparseLocalizedGP


def _data(n=24, dim=2, e=3):
    gen = torch.Generator().manual_seed(5)
    return torch.randn(n, dim, generator=gen), torch.randn(n, e, generator=gen), \
        0.1 * torch.rand(n, e, generator=gen)


def _pic_with_all_tasks(tau, e):
    pic = SparseLocalizedGP.from_descriptors(tau, e, num_inducing=len(tau), num_blocks=1)
    with torch.no_grad():
        pic.inducing.copy_(tau.double().expand(e, -1, -1))
    return pic


def test_pic_with_one_block_and_all_tasks_equals_the_exact_gp():
    tau, mu, var = _data()
    e = mu.shape[1]
    exact = SparseLocalizedGP.from_descriptors(tau, e, exact=True)
    pic = _pic_with_all_tasks(tau, e)
    # reference computed densely with torch.distributions, independent of the Woodbury code
    x = tau.double().expand(e, -1, -1)
    cov = exact.kernel.forward(x, x) + exact.noise[:, None, None] * torch.eye(len(tau))
    mvn = torch.distributions.MultivariateNormal(torch.zeros(e, len(tau), dtype=torch.float64), cov)
    dense = mvn.log_prob(mu.T.double()).sum()
    trace = (torch.diagonal(torch.linalg.inv(cov), dim1=-2, dim2=-1) * var.T.double()).sum()
    for model in (exact, pic):
        torch.testing.assert_close(model.expected_log_prob(mu).detach(), dense)
        torch.testing.assert_close(model.expected_log_prob(mu, var).detach(), dense - 0.5 * trace)
    q = torch.randn(7, 2)
    exact.condition(mu)
    pic.condition(mu)
    ks = exact.kernel.forward(q.double().expand(e, -1, -1), x).detach()
    kinv = torch.linalg.inv(cov).detach()
    mean = (ks @ kinv @ mu.T.double()[..., None])[..., 0].T
    var_ref = (exact.kernel.outputscale[:, None] - torch.einsum("eqn,enk,eqk->eq", ks, kinv, ks)
               + exact.noise[:, None]).T.detach()
    for model in (exact, pic):
        m, v = model.predict(q)
        torch.testing.assert_close(m, mean.float(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(v, var_ref.float(), rtol=1e-4, atol=1e-6)


def test_pic_blocks_match_the_dense_pic_covariance_and_predictive():
    tau, mu, var = _data(n=40)
    e = mu.shape[1]
    pic = SparseLocalizedGP.from_descriptors(tau, e, num_inducing=6, num_blocks=4, seed=2)
    assert pic.num_blocks == 4
    with torch.no_grad():
        pic.inducing.add_(0.1 * torch.randn_like(pic.inducing))  # distinct sets per dimension
    x = tau.double()
    xp = pic.inducing.detach()
    k = lambda a, b: pic.kernel.forward(a, b).detach()  # noqa: E731
    kpp = k(xp, xp) + 1e-6 * pic.kernel.outputscale.detach()[:, None, None] * torch.eye(6)
    knp = k(x.expand(e, -1, -1), xp)
    q_nn = knp @ torch.linalg.solve(kpp, knp.transpose(-1, -2))
    same = pic.labels[:, None] == pic.labels[None, :]
    k_nn = k(x.expand(e, -1, -1), x.expand(e, -1, -1))
    cov = torch.where(same, k_nn, q_nn) + pic.noise.detach()[:, None, None] * torch.eye(40)
    mvn = torch.distributions.MultivariateNormal(torch.zeros(e, 40, dtype=torch.float64), cov)
    torch.testing.assert_close(pic.expected_log_prob(mu).detach(), mvn.log_prob(mu.T.double()).sum())
    trace = (torch.diagonal(torch.linalg.inv(cov), dim1=-2, dim2=-1) * var.T.double()).sum()
    torch.testing.assert_close(pic.expected_log_prob(mu, var).detach(),
                               mvn.log_prob(mu.T.double()).sum() - 0.5 * trace)
    # predictive: exact within the nearest block, through tau+ elsewhere
    qx = torch.randn(5, 2)
    pic.condition(mu)
    r = pic.nearest_block(qx)
    kq = k(qx.double().expand(e, -1, -1), xp)
    q_sn = kq @ torch.linalg.solve(kpp, knp.transpose(-1, -2))
    k_sn = k(qx.double().expand(e, -1, -1), x.expand(e, -1, -1))
    in_block = r[:, None] == pic.labels[None, :]
    kt = torch.where(in_block, k_sn, q_sn)
    cinv = torch.linalg.inv(cov)
    mean = (kt @ cinv @ mu.T.double()[..., None])[..., 0].T
    v = (pic.kernel.outputscale.detach()[:, None] - torch.einsum("eqn,enk,eqk->eq", kt, cinv, kt)
         + pic.noise.detach()[:, None]).T
    m_pic, v_pic = pic.predict(qx)
    torch.testing.assert_close(m_pic, mean.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(v_pic, v.float(), rtol=1e-3, atol=1e-5)


def test_prior_has_gradients_for_kernel_and_representative_tasks():
    tau, mu, var = _data()
    pic = SparseLocalizedGP.from_descriptors(tau, 3, num_inducing=5, num_blocks=3)
    pic.expected_log_prob(mu, var).backward()
    assert pic.inducing.grad is not None and pic.inducing.grad.abs().sum() > 0
    assert pic.kernel.base_kernel.raw_lengthscale.grad.abs().sum() > 0


def test_saved_state_rebuilds_the_same_prior():
    tau, mu, _ = _data()
    pic = SparseLocalizedGP.from_descriptors(tau, 3, num_inducing=5, num_blocks=3)
    again = SparseLocalizedGP.from_state(pic.state_dict(), exact=False)
    torch.testing.assert_close(again.expected_log_prob(mu), pic.expected_log_prob(mu))


def test_large_blocks_are_split_to_the_cap():
    from fedfuse.pic import cap_blocks

    x = torch.randn(100, 2, dtype=torch.float64)
    labels = torch.zeros(100, dtype=torch.long)
    labels[:10] = 1
    capped = cap_blocks(x, labels, cap=25)
    sizes = torch.bincount(capped)
    assert sizes.max() <= 25 and sizes.sum() == 100
    assert set(capped[:10].tolist()) == {1}  # small blocks are kept whole
    pic = SparseLocalizedGP.from_descriptors(torch.rand(400, 2), 2, num_inducing=8, block_size=40)
    assert pic.block_index.shape[1] <= 50


def test_frozen_prior_equals_the_full_one_and_differentiates_through_the_codes():
    tau, mu, var = _data(n=40)
    pic = SparseLocalizedGP.from_descriptors(tau, 3, num_inducing=6, num_blocks=4)
    prior = pic.frozen()
    mu = mu.clone().requires_grad_(True)
    frozen = prior.expected_log_prob(mu, var)
    torch.testing.assert_close(frozen, pic.expected_log_prob(mu, var).detach())
    frozen.backward()
    grad = mu.grad.clone()
    mu.grad = None
    pic.expected_log_prob(mu, var).backward()
    torch.testing.assert_close(grad.double(), mu.grad.double())


def test_every_block_given_is_the_full_objective_and_a_random_subset_estimates_it():
    """The stochastic-block objective of the hyperparameter steps (``gp_blocks``): with every
    block it is the full density, value and gradients; a random subset, rescaled, estimates it."""
    tau, mu, var = _data(n=200)
    pic = SparseLocalizedGP.from_descriptors(tau, 3, num_inducing=8, num_blocks=10, seed=1)
    full = pic.expected_log_prob(mu, var)
    grads = torch.autograd.grad(full, [pic.inducing, pic.kernel.base_kernel.raw_lengthscale, pic.raw_noise])
    every = pic.expected_log_prob(mu, var, blocks=torch.randperm(10))  # any order
    torch.testing.assert_close(every, full)
    for g, h in zip(grads, torch.autograd.grad(every, [pic.inducing, pic.kernel.base_kernel.raw_lengthscale,
                                                       pic.raw_noise])):
        torch.testing.assert_close(g, h)
    gen = torch.Generator().manual_seed(0)
    estimates = torch.stack([pic.expected_log_prob(mu, var, blocks=torch.randperm(10, generator=gen)[:5]).detach()
                             for _ in range(40)])
    # the block sums are unbiased; the coupling through tau+ (log|C|, t^T C^-1 t) is a ratio estimate
    assert abs(float(estimates.mean() / full.detach()) - 1) < 0.1
    half = pic.expected_log_prob(mu, var, blocks=torch.arange(5))
    assert torch.autograd.grad(half, pic.kernel.base_kernel.raw_lengthscale)[0].abs().sum() > 0


def test_kmeans_seeding_is_scipys_kmeans_plus_plus():
    """The O(n k) seeding draws the same centres as scipy's O(n k^2) one: blocks do not change."""
    import numpy as np
    from scipy.cluster.vq import kmeans2

    from fedfuse.pic import kmeans

    x = torch.randn(500, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    centres, labels = kmeans2(x.numpy(), 12, minit="++", seed=4)
    ours, our_labels = kmeans(x, 12, 4)
    used = np.unique(labels)
    assert np.array_equal(ours.numpy(), centres[used]) and len(used) == len(ours)
    assert np.array_equal(np.unique(our_labels.numpy(), return_counts=True)[1],
                          np.unique(labels, return_counts=True)[1])


def test_leave_one_out_codes_equal_the_exact_gp_refitted_without_each_task():
    """Each task's code predicted from the others alone (the exact GP with the prior's kernel
    and noise, refitted without it here by brute force); with fewer neighbours, from its
    nearest others by the kernel's mean lengthscales."""
    tau, mu, _ = _data(n=20)
    e = mu.shape[1]
    pic = SparseLocalizedGP.from_descriptors(tau, e, num_inducing=8, num_blocks=2)
    with torch.no_grad():  # every code dimension its own lengthscales, scale and noise
        pic.kernel.base_kernel.lengthscale = torch.tensor([[[0.7, 1.6]], [[1.1, 0.9]], [[2.0, 0.5]]])
        pic.kernel.outputscale = torch.tensor([0.5, 1.0, 2.5])
        pic.raw_noise.copy_(torch.tensor([-3.0, -1.0, 0.5]))
    index = torch.tensor([0, 7, 19, 7])  # chunks of 2, a task asked twice

    def exact_without(i, others):
        x = tau.double()[others].expand(e, -1, -1)
        k = pic.kernel.forward(x, x) + pic.noise[:, None, None] * torch.eye(len(others), dtype=torch.float64)
        ks = pic.kernel.forward(tau.double()[i : i + 1].expand(e, -1, -1), x)
        return (ks @ torch.linalg.solve(k, mu.double()[others].T[..., None]))[:, 0, 0].detach()

    everyone = torch.stack([exact_without(i, [j for j in range(20) if j != i]) for i in index.tolist()])
    torch.testing.assert_close(pic.loo_mean(mu, index, chunk=2), everyone.float(), rtol=1e-4, atol=1e-5)
    scaled = tau.double() / pic.kernel.base_kernel.lengthscale.detach().mean(0)
    nearest = []
    for i in index.tolist():
        d = (scaled - scaled[i]).norm(dim=1)
        d[i] = float("inf")
        nearest.append(exact_without(i, d.argsort()[:5].tolist()))
    torch.testing.assert_close(pic.loo_mean(mu, index, neighbours=5), torch.stack(nearest).float(), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(pic.loo_mean(mu, index), mu[index], atol=1e-2)  # its own code is not used
    two = SparseLocalizedGP.from_descriptors(tau[:2], e, num_inducing=2, num_blocks=1)
    torch.testing.assert_close(two.loo_mean(mu[:2], torch.tensor([1])),  # the other task alone
                               (two.kernel.forward(tau[1:2].double().expand(e, -1, -1), tau[:1].double().expand(e, -1, -1))[:, 0, 0]
                                * mu[0].double() / (two.kernel.outputscale + two.noise)).detach()[None].float())
