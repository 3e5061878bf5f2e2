import copy
import math
import pytest
import torch

from fedfuse.errors import ArchitectureError, DescriptorError, FedfuseError, NotFittedError
from fedfuse.architectures import MLPSpec
from fedfuse.meta_model import MetaModel
from fedfuse.tasks import sine
from fedfuse.zoo import ModelZoo

FAST = dict(hidden=(64,), max_rounds=3, steps_per_round=60, code_dim=4, base_dim=4)
PROBE = torch.linspace(-5, 5, 32)[:, None]
FAST_LR = 3e-3  # the decoder's learning rate, which the GP used before it had its own


@pytest.fixture(scope="module")
def fitted(small_sine_zoo):
    _, zoo = small_sine_zoo
    return MetaModel(**FAST).fit(zoo, probe=PROBE)


def test_elbo_rises_during_fit(fitted):
    elbos = [h["elbo"] for h in fitted.history_]
    assert len(elbos) >= 2
    assert elbos[-1] > elbos[0]
    assert all(b > a for a, b in zip(elbos, elbos[1:]))


def test_personalize_gives_a_posterior_with_torch_distribution_vocabulary(fitted):
    post = fitted.personalize([[2.0, 1.0], [0.5, 0.3]])
    assert post.mean.shape == (2, 301) and post.variance.shape == (2, 301)
    readout = sine.SPEC.readout_index.flatten()
    hidden = torch.ones(301, dtype=torch.bool)
    hidden[readout] = False
    # function space: the decoded features are a point estimate, the readout carries the spread
    assert (post.variance[:, readout] >= 0).all() and (post.variance[:, readout].sum(1) > 0).all()
    assert (post.variance[:, hidden] == 0).all()
    draws = post.rsample((5,), generator=torch.Generator().manual_seed(0))
    assert draws.shape == (5, 2, 301)
    assert torch.equal(draws[..., hidden], post.mean[:, hidden].expand(5, -1, -1))
    assert torch.allclose(draws.var(0)[:, readout].mean(), post.variance[:, readout].mean(), rtol=1.0)
    dist = post.readout.distribution()
    assert dist.loc.shape == (2, 101) and torch.allclose(dist.variance.float(), post.readout.variance, rtol=1e-3, atol=1e-6)
    assert post.code_variance.shape == (2, 4) and (post.code_variance > 0).all()
    assert len(post.unflatten()[0]) == 4


def test_without_a_probe_it_is_the_papers_decoded_posterior(small_sine_zoo):
    _, zoo = small_sine_zoo
    model = MetaModel(**FAST).fit(zoo)  # no probe: no function space for a network
    post = model.personalize([[2.0, 1.0]])
    assert model.function_ is None and post.readout is None
    assert torch.equal(post.mean, model.decode([[2.0, 1.0]]))
    assert (post.variance > 0).all()
    assert post.rsample((3,), generator=torch.Generator().manual_seed(0)).shape == (3, 1, 301)


def test_function_space_beats_the_papers_decoder_and_the_nearest_model(fitted, small_sine_zoo):
    tasks, zoo = small_sine_zoo
    held_out = sine.sample_tasks(40, seed=98)
    ours = sine.nrmse(sine.SPEC, fitted.personalize(held_out.tau).mean, held_out)
    decoded = sine.nrmse(sine.SPEC, fitted.decode(held_out.tau), held_out)
    nearest = zoo.weights[torch.cdist(held_out.tau, tasks.tau).argmin(1)]
    assert ours.mean() < 0.7 * decoded.mean()
    assert ours.mean() < sine.nrmse(sine.SPEC, nearest, held_out).mean()
    # the expected error orders the tasks' actual errors
    from scipy.stats import spearmanr
    post = fitted.personalize(held_out.tau)
    assert spearmanr(post.uncertainty.numpy(), ours.numpy())[0] > 0.4


def test_fit_sees_only_the_zoo_and_the_probe(small_sine_zoo, monkeypatch):
    """Settings are chosen on the zoo alone: no task generator or data set is touched by fit (its
    only other input is an earlier fit of a zoo, for an incremental refit)."""
    import inspect

    import fedfuse.datasets
    from fedfuse.tasks import mnist

    assert list(inspect.signature(MetaModel.fit).parameters) == ["self", "zoo", "probe", "previous"]

    def forbidden(*args, **kwargs):
        raise AssertionError("fit reached for task data")

    for module, names in ((sine, ("sample_tasks", "sample_x", "eval_grid", "nrmse")),
                          (mnist, ("sample_tasks", "task_data", "shots_per_digit", "accuracy")),
                          (fedfuse.datasets, ("load_mnist", "load_movielens_100k"))):
        for name in names:
            monkeypatch.setattr(module, name, forbidden)
    _, zoo = small_sine_zoo
    model = MetaModel(**FAST).fit(zoo, probe=PROBE)
    assert model.function_ is not None and model.readout_ridge_ > 0


def test_far_descriptor_has_larger_code_variance(fitted):
    near = fitted.personalize([2.5, 1.5]).code_variance
    far = fitted.personalize([60.0, -40.0]).code_variance
    assert (far > near).all()


def test_save_load_round_trips_to_identical_initializers(fitted, tmp_path):
    path = tmp_path / "mm.safetensors"
    fitted.save(path)
    assert path.stat().st_size < 4 * 2**20
    back = MetaModel.load(path)
    tau = torch.tensor([[1.0, 0.5], [4.0, 2.5]])
    assert torch.equal(back.personalize(tau).mean, fitted.personalize(tau).mean)
    assert torch.equal(back.personalize(tau).variance, fitted.personalize(tau).variance)
    assert torch.equal(back.personalize(tau).uncertainty, fitted.personalize(tau).uncertainty)
    assert back.get_params() == fitted.get_params()


def test_the_previous_format_still_loads_and_an_unknown_one_is_refused(fitted, tmp_path, monkeypatch):
    from fedfuse import meta_model

    monkeypatch.setattr(meta_model, "FORMAT", "fedfuse.meta_model/2")  # what earlier releases wrote
    fitted.save(tmp_path / "v2.safetensors")
    monkeypatch.setattr(meta_model, "FORMAT", "fedfuse.meta_model/3")
    fitted.save(tmp_path / "v3.safetensors")
    monkeypatch.setattr(meta_model, "FORMAT", "fedfuse.meta_model/1")
    fitted.save(tmp_path / "v1.safetensors")
    monkeypatch.undo()
    tau = torch.tensor([[1.0, 0.5]])
    for old in ("v2", "v3"):
        assert torch.equal(MetaModel.load(tmp_path / f"{old}.safetensors").personalize(tau).mean,
                           fitted.personalize(tau).mean)
    with pytest.raises(FedfuseError, match="not a meta-model"):
        MetaModel.load(tmp_path / "v1.safetensors")


def test_unfitted_and_bad_descriptors_are_refused(fitted):
    with pytest.raises(NotFittedError, match="not fitted"):
        MetaModel().personalize([1.0, 2.0])
    with pytest.raises(DescriptorError, match="length 3; this model expects 2"):
        fitted.personalize([1.0, 2.0, 3.0])
    with pytest.raises(DescriptorError, match="non-finite"):
        fitted.personalize([float("nan"), 2.0])
    bad = fitted.personalize([1.0, 2.0]).mean.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ArchitectureError, match="non-finite"):
        fitted.personalize([1.0, 2.0], features=bad)


def test_alignment_lowers_negative_elbo_on_permuted_copies():
    spec = MLPSpec((1, 40, 1))
    gen = torch.Generator().manual_seed(0)
    tasks = sine.sample_tasks(4, seed=3)
    bases = sine.pretrain(tasks, seed=4, points=100, steps=300, spec=spec)
    weights, taus = [], []
    for i in range(24):  # six scrambled, slightly perturbed copies of each of four nets
        j = i % 4
        perm = [torch.randperm(40, generator=gen)]
        weights.append(spec.permute(bases[j], perm) + 1e-3 * torch.randn(spec.num_weights, generator=gen))
        taus.append(tasks.tau[j] + 0.01 * torch.randn(2, generator=gen))
    zoo = ModelZoo(spec, torch.stack(weights), torch.stack(taus), [str(i) for i in range(24)])
    settings = dict(FAST, max_rounds=2)
    aligned = MetaModel(align=True, **settings).fit(zoo)
    plain = MetaModel(align=False, **settings).fit(zoo)
    assert -aligned.history_[-1]["elbo"] < -plain.history_[-1]["elbo"]
    # the aligned model reconstructs each copy's function; the unaligned one blurs them
    x = torch.linspace(-5, 5, 50)[:, None]
    truth = spec.forward(zoo.weights, x)
    err = lambda m: ((spec.forward(m.reconstruct(), x) - truth) ** 2).mean()  # noqa: E731
    assert err(aligned) < err(plain)


def test_fit_is_reproducible_with_a_seed(small_sine_zoo):
    _, zoo = small_sine_zoo
    settings = dict(FAST, max_rounds=1, steps_per_round=10)
    a = MetaModel(**settings).fit(zoo).personalize([1.0, 1.0]).mean
    b = MetaModel(**settings).fit(zoo).personalize([1.0, 1.0]).mean
    assert torch.equal(a, b)


def test_far_descriptors_are_flagged_low_confidence(fitted):
    post = fitted.personalize([[2.5, 1.5], [60.0, -40.0]])
    assert post.novelty[0] < 0.5 < post.novelty[1]
    assert post.uncertainty[0] < post.uncertainty[1]
    assert post.low_confidence().tolist() == [False, True]


def test_gp_hyperparameters_are_fitted_not_left_at_their_init(small_sine_zoo):
    """At the decoder's learning rate the lengthscales stayed near 1 and unseen tasks decoded to
    nearly the zoo average (MNIST 0-shot 29% at K = 5); ``gp_lr`` moves them."""
    _, zoo = small_sine_zoo
    slow = MetaModel(**FAST, gp_lr=FAST_LR).fit(zoo, probe=PROBE)
    fast = MetaModel(**FAST).fit(zoo, probe=PROBE)
    moved = lambda m: (m.module_.prior.kernel.base_kernel.lengthscale - 1).abs().max()  # noqa: E731
    assert moved(slow) < 0.1 < moved(fast)


@pytest.mark.slow
def test_a_cnn_zoo_fits_and_personalizes():
    """Channels and hidden units are what the alignment permutes: a zoo of small CNNs on
    synthetic two-class image tasks fits, and a held-out task's initializer beats chance."""
    from fedfuse.architectures import ModuleSpec
    from fedfuse.training import train_networks

    spec = ModuleSpec("small-cnn", {"channels": [4, 6], "hidden": 8, "classes": 2, "side": 12, "kernel": 3})
    gen = torch.Generator().manual_seed(0)
    angles = torch.rand(16, generator=gen) * 3.1416  # a task: which way a stripe pattern is oriented
    grid = torch.stack(torch.meshgrid(torch.arange(12.0), torch.arange(12.0), indexing="ij"), -1)

    def images(theta: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        y = torch.randint(0, 2, (n,), generator=g)
        direction = torch.stack([theta.cos(), theta.sin()])
        phase = (grid @ direction)[None] * (0.6 + 0.6 * y[:, None, None])  # class: stripe frequency
        x = torch.sin(phase) + 0.3 * torch.randn(n, 12, 12, generator=g)
        return x.reshape(n, -1), y

    data = [images(a, 200, i) for i, a in enumerate(angles)]
    weights = train_networks(spec, spec.init(16, gen), torch.stack([d[0] for d in data]),
                             torch.stack([d[1] for d in data]), steps=150, lr=1e-2, loss="ce")
    zoo = ModelZoo(spec, weights, angles[:, None], [f"cnn{i}" for i in range(16)])
    probe = torch.cat([images(a, 16, 100 + i)[0] for i, a in enumerate(angles)])
    # distillation's count given: its choice (the sine zoos' tests) trains 16 CNNs for 1,000 steps
    model = MetaModel(**{**FAST, "max_rounds": 2}, likelihood="softmax", distill_steps=100).fit(zoo, probe=probe)
    assert [len(p[0]) for p in model.perms_] == [4, 6, 8]
    x, y = images(torch.tensor(1.0), 300, 999)
    for distill in (False, True):
        init = model.personalize([[1.0]], distill=distill).mean
        accuracy = (spec.forward(init, x)[0].argmax(-1) == y).float().mean()
        assert accuracy > 0.7


def test_an_incremental_refit_fits_new_models_into_the_previous_fit(small_sine_zoo):
    from fedfuse.fitter import READOUT_RIDGES

    _, zoo = small_sine_zoo
    settings = {**FAST, "max_rounds": 2}
    old = zoo.subset(range(26))
    before = MetaModel(**settings).fit(old, probe=PROBE)
    grown = zoo  # four new devices joined
    refit = MetaModel(**settings).fit(grown, probe=PROBE, previous=before)
    assert refit.refit_ == {"new_or_replaced": 4, "carried_over": 26}
    assert refit.ids_ == grown.ids and len(refit.history_) == len(before.history_) + refit.n_rounds_
    assert refit.function_.kernel_name_ == before.function_.kernel_name_
    assert set(refit.readout_errors_) == set(READOUT_RIDGES)  # the ridge moves with the zoo: chosen again
    # the carried-over models keep their alignments; only the new ones are (re)solved
    assert all(torch.equal(p_new[:26], p_old) for p_new, p_old in zip(refit.perms_, before.perms_))
    full = MetaModel(**settings).fit(grown, probe=PROBE)
    held_out = sine.sample_tasks(30, seed=97)
    err = lambda m: sine.nrmse(sine.SPEC, m.personalize(held_out.tau).mean, held_out).mean()  # noqa: E731
    assert err(refit) < 1.1 * err(full)
    # how the refit runs is not a change of model: still incremental
    assert MetaModel(**settings, refit_rounds=2).fit(grown, probe=PROBE, previous=before).refit_["new_or_replaced"] == 4
    # too much changed: a full refit instead
    half = MetaModel(**settings).fit(grown, probe=PROBE, previous=MetaModel(**settings).fit(zoo.subset(range(15)), probe=PROBE))
    assert half.refit_ == {}


def test_gp_blocks_leave_small_zoos_as_they_were_and_subsample_larger_ones(fitted, small_sine_zoo):
    """A zoo with no more PIC blocks than ``gp_blocks`` is fitted exactly as with every block
    (no extra random draws); with more, each hyperparameter step sees ``gp_blocks`` of them."""
    from fedfuse.fitter import _gp_blocks

    _, zoo = small_sine_zoo
    every = MetaModel(**FAST, gp_blocks=None).fit(zoo, probe=PROBE)
    assert fitted.gp_blocks == 64 and fitted.module_.prior.num_blocks <= 64
    assert [h["elbo"] for h in every.history_] == [h["elbo"] for h in fitted.history_]
    torch.testing.assert_close(every.personalize([[2.0, 1.0]]).mean, fitted.personalize([[2.0, 1.0]]).mean,
                               rtol=0, atol=0)
    few = MetaModel(**FAST, block_size=5, gp_blocks=2).fit(zoo, probe=PROBE)
    assert few.module_.prior.num_blocks > 2
    assert len(_gp_blocks(few, torch.Generator().manual_seed(0))) == 2
    assert all(math.isfinite(h["elbo"]) for h in few.history_)


def test_readout_prior_is_the_function_space_predictive_mapped_through_the_readout_solve(fitted):
    model = copy.deepcopy(fitted)
    model.function_.nearby_size_, model.function_.nearby_shrink_ = 8, 0.3  # rows from nearby models too
    model.function_._condition()
    tau = torch.tensor([[1.0, 0.5], [4.0, 2.5]])
    pred = model.function_.predict(tau)
    post = model.personalize(tau)
    assert pred.nearby is not None and post.readout.factor.shape[-1] == pred.factor().shape[1]
    _, a = model._solved_readout(post.mean, pred.mean)  # sine: one output, so (q, h + 1, N) maps functions
    fs = pred.factor().double()
    cov_fs = fs.transpose(1, 2) @ fs + torch.diag_embed(pred.scale.double()[:, None] ** 2 * pred.residual.double())
    f = post.readout.factor.double()
    cov = f @ f.transpose(1, 2) + torch.diag_embed(post.readout.diag.double())
    low_rank = a @ fs.transpose(1, 2) @ fs @ a.transpose(1, 2)
    off = ~torch.eye(cov.shape[-1], dtype=torch.bool)
    atol = 1e-6 * float(low_rank.abs().max())  # the map is applied in single precision: errors scale with the largest entry
    assert torch.allclose(cov[:, off], low_rank[:, off], rtol=1e-3, atol=atol)  # the diagonal part stays diagonal
    full = a @ cov_fs @ a.transpose(1, 2)
    assert torch.allclose(post.readout.variance.double(), torch.diagonal(full, dim1=1, dim2=2), rtol=1e-3, atol=atol)


def test_a_vector_zoo_without_probe_reconstructs_its_uploads_with_their_own_readout():
    from fedfuse.architectures import VectorSpec

    gen = torch.Generator().manual_seed(0)
    tau = torch.rand(30, 2, generator=gen)
    weights = torch.cat([tau, tau.sum(1, keepdim=True)], 1) + 0.01 * torch.randn(30, 3, generator=gen)
    zoo = ModelZoo(VectorSpec(3), weights, tau, [f"v{i}" for i in range(30)])
    model = MetaModel(**FAST).fit(zoo)
    assert torch.allclose(model.reconstruct(own_readout=True), weights, atol=1e-5)
    # with a probe (item features) a bare vector is all readout, solved exactly: nothing to distill
    probed = MetaModel(**FAST, distill_steps=50).fit(zoo, probe=torch.rand(8, 3, generator=gen))
    assert probed.distill_steps_ == 0
    assert torch.equal(probed.personalize([0.5, 0.5], distill=True).mean, probed.personalize([0.5, 0.5]).mean)


def test_a_multi_output_readout_prior_keeps_each_output_with_its_own_rows():
    """With several outputs the map from functions to readouts acts on each output's values; the
    prior's rows and diagonal must land on that output's readout entries (``h`` major, output
    minor, as ``readout_index`` orders them)."""
    spec = MLPSpec((1, 8, 3))
    gen = torch.Generator().manual_seed(4)
    tau = torch.rand(24, 2, generator=gen) * 3
    zoo = ModelZoo(spec, spec.init(24, gen), tau, [f"m{i:02d}" for i in range(24)])
    model = MetaModel(**FAST).fit(zoo, probe=torch.linspace(-2, 2, 12)[:, None])
    new = torch.tensor([[1.0, 2.0], [2.5, 0.5]])
    pred, post = model.function_.predict(new), model.personalize(new)
    codes = model.module_.prior.predict(model._normalize(new))[0]
    assert torch.equal(model.module_.decode_mean(codes), model.module_.decode(codes)[0])
    _, a = model._solved_readout(post.mean, pred.mean)  # (q, h + 1, N)
    rows = pred.factor().reshape(2, -1, 12, 3)  # (q, r, N, c)
    expected = torch.einsum("qhn,qrnc->qhcr", a, rows.double()).reshape(2, 27, -1)
    torch.testing.assert_close(post.readout.factor.double(), expected, rtol=1e-4, atol=1e-7)
    diag = (pred.scale[:, None] ** 2 * pred.residual).reshape(2, 12, 3).double()
    torch.testing.assert_close(post.readout.diag.double(), torch.einsum("qhn,qnc->qhc", a**2, diag).reshape(2, 27),
                               rtol=1e-4, atol=1e-9)


def test_distillation_trains_every_weight_towards_the_predicted_function(fitted, small_sine_zoo, tmp_path):
    """The slower path: the network computes the predicted function on the probe more closely
    than the solved readout alone does, its hidden layers move, and its readout prior is solved on
    them; the step count is the one the zoo's simulated devices chose, and it is saved."""
    from fedfuse.fitter import DISTILL_STEPS

    assert set(fitted.distill_errors_) == set(DISTILL_STEPS)
    assert fitted.distill_steps_ == min(fitted.distill_errors_, key=fitted.distill_errors_.get)
    tau = torch.tensor([[1.0, 0.5], [4.0, 2.5]])
    target = fitted.function_.predict(tau).mean
    model = copy.copy(fitted)
    model.distill_steps_ = 300  # whatever this small zoo chose, the path must train
    fast, slow = model.personalize(tau), model.personalize(tau, distill=True)
    gap = lambda w: (sine.SPEC.forward(w, PROBE).flatten(1) - target).norm(dim=1)  # noqa: E731
    assert (gap(slow.mean) < 0.9 * gap(fast.mean)).all()
    assert slow.distilled and not fast.distilled  # and the initializer says which path made it
    hidden = torch.ones(301, dtype=torch.bool)
    hidden[sine.SPEC.readout_index.flatten()] = False
    assert not torch.allclose(slow.mean[:, hidden], fast.mean[:, hidden])
    # the readout prior is the one personalize(features=...) gives for the distilled hidden layers
    again = model.personalize(tau, features=slow.mean)
    assert torch.equal(again.mean[:, hidden], slow.mean[:, hidden])
    assert torch.allclose(again.readout.factor, slow.readout.factor, atol=1e-6)
    model.distill_steps_ = 0  # the zoo found no gain: the fast initializer, unchanged
    unchanged = model.personalize(tau, distill=True)
    assert torch.equal(unchanged.mean, fast.mean) and not unchanged.distilled
    fitted.save(tmp_path / "mm.safetensors")
    assert MetaModel.load(tmp_path / "mm.safetensors").distill_steps_ == fitted.distill_steps_


def test_a_given_distill_step_count_is_used_and_a_fit_without_function_space_refuses(small_sine_zoo):
    _, zoo = small_sine_zoo
    model = MetaModel(**FAST, distill_steps=7).fit(zoo, probe=PROBE)
    assert model.distill_steps_ == 7 and model.distill_errors_ == {}
    with pytest.raises(FedfuseError, match="function-space head"):
        MetaModel(**FAST).fit(zoo).personalize([[2.0, 1.0]], distill=True)


def _simulated_devices(fitted, seed, count):
    """The fit's simulated devices, from their definition: ``count`` held-out zoo models drawn
    as the fit draws them, their leave-one-out predictions, their uploads' own functions and
    the networks decoded at their leave-one-out codes."""
    fn, module = fitted.function_, fitted.module_
    pick = fn.loo_index_[torch.randperm(len(fn.loo_index_), generator=torch.Generator().manual_seed(seed))[:count]]
    mean = fn.loo_predictions(pick, nearby=False).mean.double()[..., None]
    own = (fn.y_[pick] + fn.mu_)[..., None]
    with torch.no_grad():
        base = module.decode_mean(module.prior.loo_mean(module.codes.mean.detach(), pick))
    return pick, mean, own, base


def test_the_readout_ridge_is_judged_against_the_held_out_upload_at_probe_inputs_left_out(fitted):
    """The simulated devices' score, recomputed here from its definition: each held-out model's
    network decoded at its leave-one-out code, with its readout solved for the model's
    leave-one-out prediction on every probe input but one, its error against the model's own
    upload at the one left out, relative to the upload's spread over the probe; the fit takes
    the smallest score's ridge."""
    from fedfuse import fitter
    from fedfuse.readout import held_out_outputs

    probe = fitted.probe_
    pick, mean, own, base = _simulated_devices(fitted, 5, 16)
    spread = (own - own.mean(1, keepdim=True)).norm(dim=(1, 2))
    expected = {r: float(((held_out_outputs(sine.SPEC, base, probe, mean, r) - own).norm(dim=(1, 2)) / spread).mean())
                for r in fitter.READOUT_RIDGES}
    again = MetaModel(**FAST)
    again.__dict__.update(fitted.__dict__)
    chosen = fitter._choose_readout_ridge(again, torch.Generator().manual_seed(5), 16)
    assert again.readout_errors_ == pytest.approx(expected, rel=1e-9)
    assert chosen == min(expected, key=expected.get)
    assert set(fitted.readout_errors_) == set(fitter.READOUT_RIDGES)
    assert fitted.readout_ridge_ == min(fitted.readout_errors_, key=fitted.readout_errors_.get)
    # the model's own fitted code would decode its upload, readout included: not what a new device gets
    assert not torch.allclose(base, fitted.reconstruct()[pick], atol=1e-3)


def test_distillation_steps_are_judged_against_the_held_out_upload(fitted):
    """The step count's score, recomputed from its definition: each simulated device (decoded
    at its leave-one-out code) solved and distilled towards its leave-one-out prediction on
    the probe's even inputs, its readout solved again, its error against its own upload on the
    odd inputs relative to the upload's spread there; the smallest score's count is taken."""
    from fedfuse import fitter
    from fedfuse.readout import set_readout, solve_readout

    probe = fitted.probe_
    pick, mean, own, base = _simulated_devices(fitted, 3, 8)
    even, odd, ridge = slice(0, None, 2), slice(1, None, 2), fitted.readout_ridge_
    solved = lambda w: set_readout(sine.SPEC, w, solve_readout(sine.SPEC, w, probe[even], mean[:, even], ridge)[0])  # noqa: E731
    spread = (own[:, odd] - own[:, odd].mean(1, keepdim=True)).norm(dim=(1, 2))
    expected = {}
    for steps in fitter.DISTILL_STEPS:
        w = solved(fitted._distilled(solved(base), mean[:, even], probe[even], steps))
        out = sine.SPEC.forward(w, probe[odd]).double()
        expected[steps] = float(((out - own[:, odd]).norm(dim=(1, 2)) / spread).mean())
    again = MetaModel(**FAST)
    again.__dict__.update(fitted.__dict__)
    chosen = fitter._choose_distill_steps(again, torch.Generator().manual_seed(3), 8)
    assert again.distill_errors_ == pytest.approx(expected, rel=1e-4)
    assert chosen == min(expected, key=expected.get)


def test_a_zoo_of_one_keeps_the_given_ridge_and_the_fast_path(small_sine_zoo):
    """With one model there is none to hold out: the ridge as given, no distillation unless
    given; two models are enough to choose both."""
    from fedfuse import fitter

    _, zoo = small_sine_zoo
    settings = {**FAST, "max_rounds": 1, "min_rounds": 1, "readout_ridge": 3e-4}
    one = MetaModel(**settings).fit(zoo.subset([0]), probe=PROBE)
    assert one.readout_ridge_ == 3e-4 and one.readout_errors_ == {} and one.distill_steps_ == 0
    assert torch.isfinite(one.personalize([[2.0, 1.0]], distill=True).mean).all()
    assert MetaModel(**settings, distill_steps=5).fit(zoo.subset([0]), probe=PROBE).distill_steps_ == 5
    two = MetaModel(**settings).fit(zoo.subset([0, 1]), probe=PROBE)
    assert set(two.readout_errors_) == set(fitter.READOUT_RIDGES) and set(two.distill_errors_) == set(fitter.DISTILL_STEPS)


def test_class_logits_are_judged_by_their_probabilities():
    """An upload's logits mean something only up to a shift per input: a network that differs
    from it by one scores 0, one that ranks the classes differently does not; values are
    judged by their relative error."""
    from fedfuse import fitter

    own = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    classes, values = MetaModel(likelihood="softmax"), MetaModel()
    shifted = own + torch.randn(3, 5, 1, dtype=torch.float64)
    assert fitter._upload_error(classes, shifted, own) == pytest.approx(0.0, abs=1e-12)
    assert fitter._upload_error(classes, own.flip(-1), own) > 0.01
    assert fitter._upload_error(values, shifted, own) > 0.1


def test_a_fit_saved_before_distillation_distills_nothing_until_an_incremental_refit_chooses(small_sine_zoo, tmp_path):
    """A /3 file has no step count: loaded, ``distill=True`` is the fast path (``distill_steps_``
    is ``None``); an incremental refit of it chooses the steps on the zoo, as a full fit does."""
    from fedfuse.io import load_tensors, save_tensors

    _, zoo = small_sine_zoo
    settings = {**FAST, "max_rounds": 2}
    before = MetaModel(**settings).fit(zoo.subset(range(26)), probe=PROBE)
    before.save(tmp_path / "new.safetensors")
    tensors, meta = load_tensors(tmp_path / "new.safetensors")
    meta["format"] = "fedfuse.meta_model/3"  # what the last release wrote: no distillation keys
    del meta["distill_steps"], meta["settings"]["distill_steps"]
    save_tensors(tmp_path / "v3.safetensors", tensors, meta)
    old = MetaModel.load(tmp_path / "v3.safetensors")
    assert old.distill_steps_ is None
    assert torch.equal(old.personalize([[2.0, 1.0]], distill=True).mean, old.personalize([[2.0, 1.0]]).mean)
    refit = MetaModel(**settings).fit(zoo, probe=PROBE, previous=old)
    assert refit.refit_["new_or_replaced"] == 4 and refit.distill_steps_ in (0, 100, 300, 1000)
    assert set(refit.distill_errors_) == {0, 100, 300, 1000}
    with pytest.raises(FedfuseError, match="distill_steps=-1"):
        MetaModel(**settings, distill_steps=-1).fit(zoo, probe=PROBE)
