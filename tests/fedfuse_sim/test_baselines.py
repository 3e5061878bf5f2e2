import torch

from fedfuse.training import loss_fn
from fedfuse.architectures import MLPSpec, VectorSpec
from fedfuse.tasks import sine
from fedfuse_sim import baselines


def _episode(seed: int, tasks: int = 4, shots: int = 5):
    gen = torch.Generator().manual_seed(seed)
    t = sine.sample_tasks(tasks, seed)
    xs, xq = -5 + 10 * torch.rand(2, tasks, shots, 1, generator=gen)
    return xs, t(xs), xq, t(xq)


def test_maml_meta_gradient_is_second_order():
    """The torch.func meta-gradient equals a plain autograd MAML with create_graph=True."""
    spec = MLPSpec((1, 8, 8, 1))
    maml = baselines.MAML(spec, inner_lr=0.05, inner_steps=2)
    theta = spec.init(1, torch.Generator().manual_seed(0))[0].requires_grad_(True)
    xs, ys, xq, yq = _episode(0)
    got = torch.autograd.grad(torch.func.vmap(maml._query_loss, in_dims=(None, 0, 0, 0, 0))(
        theta, xs, ys, xq, yq).mean(), theta)[0]
    total = 0
    for j in range(len(xs)):
        w = theta
        for _ in range(2):
            g = torch.autograd.grad(loss_fn(spec, w[None], xs[j][None], ys[j][None], "mse")[0], w,
                                    create_graph=True)[0]
            w = w - 0.05 * g
        total = total + loss_fn(spec, w[None], xq[j][None], yq[j][None], "mse")[0]
    ref = torch.autograd.grad(total / len(xs), theta)[0]
    assert torch.allclose(got, ref, atol=1e-6)
    # the Hessian term matters: first-order MAML (gradient at the adapted weights) differs
    first = torch.stack([torch.func.grad(maml._task_loss)(maml.adapt(theta.detach(), xs[j], ys[j]), xq[j], yq[j])
                         for j in range(len(xs))]).mean(0)
    assert not torch.allclose(first, ref, atol=1e-4)


def test_maml_training_lowers_the_adapted_query_loss():
    spec = MLPSpec((1, 40, 40, 1))
    episodes = lambda step: _episode(1000 + step, tasks=10, shots=10)  # noqa: E731
    before = baselines.MAML(spec, meta_steps=0).fit(episodes)
    after = baselines.MAML(spec, meta_steps=300).fit(episodes)
    meta = torch.func.vmap(after._query_loss, in_dims=(None, 0, 0, 0, 0))
    held_out = _episode(99, tasks=50, shots=10)
    assert meta(after.theta_, *held_out).mean() < 0.7 * meta(before.theta_, *held_out).mean()
    assert after.init(3).shape == (3, spec.num_weights) and len(after.history_) == 300


def test_nearest_neighbour_and_zoo_average():
    tau = torch.tensor([[0.0, 0.0], [3.0, 1.0], [10.0, 0.0]])
    w = torch.arange(9.0).reshape(3, 3)
    # dims are standardized: [2.5, 0] is nearest to [3, 1] in raw units but to [0, 0] here
    got = baselines.nearest_neighbour(tau, w, torch.tensor([[2.5, 0.0], [9.0, 0.1]]))
    assert torch.equal(got, w[[0, 2]])
    avg = baselines.zoo_average(w, 2)
    assert torch.equal(avg, w.mean(0).expand(2, -1)) and avg.is_contiguous()


def test_aligned_neighbours_choose_k_and_bandwidth_on_the_zoo():
    gen = torch.Generator().manual_seed(0)
    tau = torch.rand(60, 2, generator=gen)
    clean = torch.stack([tau[:, 0], tau[:, 0] ** 2, tau[:, 1] * 0], 1)
    noisy = clean + 0.05 * torch.randn(60, 3, generator=gen)
    spec = VectorSpec(3)
    knn = baselines.AlignedNeighbours().fit(spec, noisy, tau)
    assert knn.k_ > 1  # noisy neighbours: averaging several beats copying one
    query = torch.rand(40, 2, generator=gen)
    truth = torch.stack([query[:, 0], query[:, 0] ** 2, query[:, 1] * 0], 1)
    nearest = baselines.nearest_neighbour(tau, noisy, query)
    assert (knn.predict(query) - truth).pow(2).mean() < (nearest - truth).pow(2).mean()
    exact = baselines.AlignedNeighbours(ks=(1,)).fit(spec, clean, tau)
    assert torch.allclose(exact.predict(tau[:5]), clean[:5])  # k = 1 on a zoo task copies it


def test_aligned_neighbours_judge_networks_on_the_probe():
    spec = MLPSpec((1, 8, 1))
    gen = torch.Generator().manual_seed(1)
    tau = torch.rand(20, 1, generator=gen)
    zoo = spec.init(20, gen)
    knn = baselines.AlignedNeighbours(ks=(1, 2), bandwidths=(0.5,)).fit(spec, zoo, tau, torch.linspace(-1, 1, 9)[:, None])
    assert set(knn.scores_) == {(1, 0.5), (2, 0.5)} and knn.predict(tau[:3]).shape == (3, spec.num_weights)


def test_maml_checkpoints_are_the_base_net_after_that_many_steps():
    spec = MLPSpec((1, 8, 8, 1))
    episodes = lambda step: _episode(2000 + step, tasks=4, shots=5)  # noqa: E731
    long = baselines.MAML(spec, meta_steps=6).fit(episodes, checkpoints=(3, 6))
    short = baselines.MAML(spec, meta_steps=3).fit(episodes)
    assert sorted(long.checkpoints_) == [3, 6]
    assert torch.equal(long.checkpoints_[3], short.theta_) and torch.equal(long.checkpoints_[6], long.theta_)
    assert not torch.equal(long.checkpoints_[3], long.theta_)
