"""The rounds that fit a :class:`~fedfuse.meta_model.MetaModel` to a zoo.

Coordinate ascent: Adam steps on the ELBO (decoder, codes, base) with the prior factored once at
fixed hyperparameters; a few steps on the prior's hyperparameters alone (they enter only the
prior term); then every model's alignment re-solved (independent per model, fanned out). Stop
on a tolerance, not a fixed count. Then the function-space GP over the zoo, the readout's ridge
and distillation's step count, all chosen on the zoo alone (leave-one-out, simulated devices).
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fedfuse.alignment import align_zoo, apply_perms, chain_align
from fedfuse.errors import FedfuseError
from fedfuse.function_space import FunctionSpaceGP
from fedfuse.parallel import ParallelMap, serial_map
from fedfuse.progress import progress_bar
from fedfuse.readout import held_out_outputs, set_readout, solve_readout
from fedfuse.zoo import ModelZoo, robust_scale

if TYPE_CHECKING:
    from fedfuse.meta_model import MetaModel, ZooModel

log = logging.getLogger(__name__)
Targets = tuple[Tensor, Tensor, Tensor]  # refinement probe, the zoo's outputs there, their scale
DISTILL_STEPS = (0, 100, 300, 1000)  # the candidates for personalize(distill=True)
READOUT_RIDGES = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7)  # the readout's, relative to its features' energy


def fit(model: "MetaModel", zoo: ModelZoo, probe: Tensor | None, previous: "MetaModel | None" = None) -> "MetaModel":
    zoo.validate()
    if model.likelihood not in ("gaussian", "softmax"):
        raise FedfuseError(f"likelihood={model.likelihood!r}: use 'gaussian' (outputs are values) "
                           "or 'softmax' (outputs are class logits)")
    steps = model.distill_steps
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 0):
        raise FedfuseError(f"distill_steps={steps!r}: use None (chosen on the zoo) or a whole number >= 0")
    start = time.perf_counter()
    if previous is not None:
        unchanged, reason = incremental_plan(model, zoo, probe, previous)
        if unchanged is not None:
            return _refit(model, zoo, probe, previous, unchanged, start)
        log.info("full refit: %s", reason)
    torch.manual_seed(model.seed)
    pmap = model.pmap or serial_map
    n, spec = len(zoo), zoo.spec
    loc, scale = robust_scale(zoo.tau)
    model._build(spec, list(zoo.ids), loc.float(), scale.float(), zoo.tau, probe)
    tau, gamma = model._normalize(zoo.tau), zoo.weights
    model.perms_ = (chain_align(spec, gamma, tau, pmap, model.chunk_size) if model.align
                    else [torch.arange(h).repeat(n, 1) for h in spec.perm_sizes])
    aligned = apply_perms(spec, gamma, model.perms_)
    model.module_.start(aligned, model.code_dim)
    targets = _refinement_targets(model, gamma, probe)
    gen = torch.Generator().manual_seed(model.seed)
    model.history_ = _rounds(model, gamma, aligned, targets, pmap, gen, model.max_rounds, model.gp_steps)
    model.n_rounds_ = len(model.history_)
    model.refit_ = {}
    model.module_.condition()
    _fit_function_space(model, zoo, probe, gen)
    model.fit_seconds_ = time.perf_counter() - start
    log.info("fit %d models in %.1fs (%d rounds)", n, model.fit_seconds_, model.n_rounds_)
    return model


def _refinement_targets(model: "MetaModel", gamma: Tensor, probe: Tensor | None) -> Targets | None:
    """The zoo's own outputs on the first probe inputs, which each decoded model is matched to
    (Sec. 3.4.2); permutation invariant, computed once, in chunks for large zoos."""
    if probe is None or model.spec_.is_vector:
        return None
    refine = probe[: model.refine_points].float()
    with torch.no_grad():
        out = torch.cat([model.spec_.forward(g, refine) for g in gamma.split(1024)])
    return refine, out, out.var(dim=(1, 2), keepdim=True, unbiased=False).clamp_min(1e-6)


def _rounds(model: "MetaModel", gamma: Tensor, aligned: Tensor, targets: Targets | None, pmap: ParallelMap,
            gen: torch.Generator, max_rounds: int, gp_steps: int, first: int = 0,
            realign: Tensor | None = None) -> list[dict[str, float]]:
    """``realign``: the indices of the models whose alignment the rounds re-solve (``None``:
    all); an incremental refit keeps the carried-over models' alignments."""
    module: ZooModel = model.module_
    n = gamma.shape[0]
    opt = torch.optim.Adam(module.variational_parameters(), lr=model.lr)
    # the hyperparameters need far larger steps than the decoder: at ``lr`` they barely leave
    # their initial lengthscale and the predictive mean shrinks to the zoo average
    gp_opt = torch.optim.Adam(module.prior.parameters(), lr=model.gp_lr)
    history: list[dict[str, float]] = []
    prev = None
    with progress_bar(model.progress, "fitting meta-model", total=max_rounds) as bar:
        frozen = module.prior.frozen()
        for rnd in range(max_rounds):
            for _ in range(model.steps_per_round):
                batch = torch.randperm(n, generator=gen)[: min(n, model.batch_size)]
                opt.zero_grad()
                loss = -module.elbo(aligned, batch, frozen, targets=targets, refine_weight=model.refine_weight)
                loss.backward()
                opt.step()
            mean, var = module.codes.mean.detach(), module.codes.variance.detach()
            for _ in range(gp_steps):
                gp_opt.zero_grad()
                (-module.prior.expected_log_prob(mean, var, _gp_blocks(model, gen))).backward()
                gp_opt.step()
            if gp_steps:  # the hyperparameters moved: one factorization serves the ELBO and the next round
                frozen = module.prior.frozen()
            with torch.no_grad():
                elbo = float(module.elbo(aligned, torch.arange(n), frozen, generator=gen))
            changed = 0.0
            if model.align and (realign is None or len(realign)):
                idx = slice(None) if realign is None else realign
                mean_s, var_s = module.sample_decoded(model.code_samples, gen, idx)
                new = align_zoo(model.spec_, gamma[idx], mean_s, var_s, [p[idx] for p in model.perms_], pmap,
                                model.chunk_size)
                moved = torch.zeros(len(mean_s), dtype=torch.bool)
                for old, p in zip(model.perms_, new):
                    moved |= (old[idx] != p).any(1)
                    old[idx] = p
                changed = float(moved.float().mean())
                aligned[idx] = apply_perms(model.spec_, gamma[idx], new)
            history.append({"round": first + rnd, "elbo": elbo, "changed": changed})
            bar.update(description=f"fitting meta-model (ELBO {elbo:.4g}, realigned {changed:.0%})")
            rel = math.inf if prev is None else abs(elbo - prev) / max(abs(prev), 1.0)
            prev = elbo
            if rnd + 1 >= min(model.min_rounds, max_rounds) and changed == 0.0 and rel < model.tol:
                break
    return history


def _gp_blocks(model: "MetaModel", gen: torch.Generator) -> Tensor | None:
    """The PIC blocks one hyperparameter step sees: ``gp_blocks`` drawn at random (stochastic
    blocks), or ``None`` (every block) where the prior has no more than that. A full step
    factors the whole prior with autograd, about 2-3 s at 20,000 models; this keeps the steps'
    cost flat in ``n`` and leaves smaller zoos' fits as they were (no extra random draws)."""
    num_blocks = model.module_.prior.num_blocks
    if model.gp_blocks is None or model.gp_blocks >= num_blocks:
        return None
    return torch.randperm(num_blocks, generator=gen)[: model.gp_blocks]


def incremental_plan(model: "MetaModel", zoo: ModelZoo, probe: Tensor | None, previous: "MetaModel"
                     ) -> tuple[Tensor | None, str]:
    """Which of the zoo's models a refit can take over from ``previous`` unchanged (same id, same
    function on the probe), or ``None`` and why a full refit is needed: other settings,
    architecture or probe; no function space to compare models in; more than ``refit_drift`` of
    the zoo new or replaced; or new models unlike the zoo (their functions further from what the
    previous fit predicted for them than ``refit_drift_error`` times its own typical LOO error)."""
    fn = previous.function_
    free = ("max_rounds", "seed", "refit_rounds", "refit_drift", "refit_drift_error")  # how to fit, not what
    same = {k: v for k, v in model.get_params().items() if k not in free}
    if same != {k: v for k, v in previous.get_params().items() if k not in free}:
        return None, "the settings changed"
    if previous.spec_ != zoo.spec or previous.tau_dim != zoo.tau_dim or fn is None:
        return None, "the architecture or descriptor changed, or there is no function space to compare in"
    if (probe is None) != (previous.probe_ is None) or (probe is not None and not torch.equal(probe.float(), previous.probe_)):
        return None, "the probe changed"
    model.probe_, model.spec_ = previous.probe_, zoo.spec
    sig = model._signatures(zoo.weights).double()
    old = {cid: i for i, cid in enumerate(previous.ids_)}
    prev_sig = fn.y_ + fn.mu_
    tol = 1e-6 * float(prev_sig.abs().max().clamp_min(1e-12))  # the stored signatures went through float64 sums
    unchanged = torch.tensor([cid in old and bool(((sig[j] - prev_sig[old[cid]]).abs() <= tol).all())
                              for j, cid in enumerate(zoo.ids)])
    fresh = ~unchanged
    if float(fresh.float().mean()) > model.refit_drift:
        return None, f"{int(fresh.sum())} of {len(zoo)} models are new or replaced (more than {model.refit_drift:.0%})"
    if fresh.any():
        pred = fn.predict(zoo.tau[fresh]).mean.double()
        spread = (sig[fresh] - sig[fresh].mean(1, keepdim=True)).norm(dim=1).clamp_min(1e-12)
        error = float(((pred - sig[fresh]).norm(dim=1) / spread).median())
        if error > model.refit_drift_error * float(fn.loo_error_.median()):
            return None, f"the new models' functions are unlike the zoo's (relative error {error:.3g})"
    return unchanged, ""


@torch.no_grad()
def _carry_over(model: "MetaModel", previous: "MetaModel", zoo: ModelZoo, unchanged: Tensor,
                pmap: ParallelMap) -> None:
    """The previous fit's decoder, base, prior hyperparameters, and the codes and alignments of
    unchanged models; new models start at their predicted code, aligned to its decoded mean."""
    module, old_module = model.module_, previous.module_
    module.decoder.load_state_dict(old_module.decoder.state_dict())
    module.base.load_state_dict(old_module.base.state_dict())
    module.log_alpha.copy_(old_module.log_alpha)
    prior, old_prior = module.prior, old_module.prior
    prior.kernel.load_state_dict(old_prior.kernel.state_dict())
    prior.raw_noise.copy_(old_prior.raw_noise)
    if prior.inducing.shape == old_prior.inducing.shape:
        prior.inducing.copy_(old_prior.inducing)
    old = {cid: i for i, cid in enumerate(previous.ids_)}
    keep = torch.nonzero(unchanged).flatten()
    src = torch.tensor([old[zoo.ids[j]] for j in keep.tolist()], dtype=torch.long)
    module.codes.loc[keep] = old_module.codes.loc[src]
    module.codes.raw_scale[keep] = old_module.codes.raw_scale[src]
    fresh = torch.nonzero(~unchanged).flatten()
    n = len(zoo)
    model.perms_ = [torch.arange(h).repeat(n, 1) for h in model.spec_.perm_sizes]
    for li, p in enumerate(previous.perms_):
        model.perms_[li][keep] = p[src]
    if len(fresh):
        code, _ = old_prior.predict(model._normalize(zoo.tau[fresh]))
        module.codes.loc[fresh] = code
        mean, var = module.decode(code)
        new = align_zoo(model.spec_, zoo.weights[fresh], mean[:, None], var[:, None],
                        [p[fresh] for p in model.perms_], pmap, model.chunk_size)
        for li, p in enumerate(new):
            model.perms_[li][fresh] = p


def _refit(model: "MetaModel", zoo: ModelZoo, probe: Tensor | None, previous: "MetaModel", unchanged: Tensor,
           start: float) -> "MetaModel":
    """An incremental refit: the previous fit carried over, ``refit_rounds`` joint rounds without
    hyperparameter steps that realign only the new or replaced models, the function-space GP
    reconditioned with its kernel kept, the readout's ridge chosen again (it depends on how
    rough the prediction is, so on the zoo's size); distillation's step count is kept (its
    choice trains 32 networks: a full refit re-chooses it)."""
    torch.manual_seed(model.seed)
    pmap = model.pmap or serial_map
    model._build(zoo.spec, list(zoo.ids), previous.tau_loc_, previous.tau_scale_, zoo.tau, probe)
    _carry_over(model, previous, zoo, unchanged, pmap)
    aligned = apply_perms(model.spec_, zoo.weights, model.perms_)
    gen = torch.Generator().manual_seed(model.seed)
    rounds = _rounds(model, zoo.weights, aligned, _refinement_targets(model, zoo.weights, probe), pmap, gen,
                     model.refit_rounds, 0, first=len(previous.history_), realign=torch.nonzero(~unchanged).flatten())
    model.history_ = previous.history_ + rounds
    model.n_rounds_ = len(rounds)
    model.module_.condition()
    model.function_ = FunctionSpaceGP(kernel=model.kernel, seed=model.seed).fit(
        zoo.tau, model._signatures(zoo.weights), torch.tensor(zoo.n_examples, dtype=torch.float64),
        previous=previous.function_)
    _set_readout_ridge(model, gen, previous.readout_ridge_)
    model.distill_steps_, model.distill_errors_ = previous.distill_steps_, {}
    if model.distill_steps_ is None:  # the previous fit predates distillation: choose now
        _set_distill_steps(model, gen)
    model.refit_ = {"new_or_replaced": int((~unchanged).sum()), "carried_over": int(unchanged.sum())}
    model.fit_seconds_ = time.perf_counter() - start
    log.info("incremental refit of %d models (%d new or replaced) in %.1fs", len(zoo), int((~unchanged).sum()),
             model.fit_seconds_)
    return model


def _fit_function_space(model: "MetaModel", zoo: ModelZoo, probe: Tensor | None, gen: torch.Generator) -> None:
    signatures = model._signatures(zoo.weights) if model.function_space else None
    model.function_ = None if signatures is None else FunctionSpaceGP(kernel=model.kernel, seed=model.seed).fit(
        zoo.tau, signatures, weights=torch.tensor(zoo.n_examples, dtype=torch.float64))
    _set_readout_ridge(model, gen, model.readout_ridge)
    _set_distill_steps(model, gen)


def _set_readout_ridge(model: "MetaModel", gen: torch.Generator, ridge: float) -> None:
    """``readout_ridge_``: chosen on the zoo's simulated devices, or ``ridge`` where there is no
    function on probe inputs or no model to hold out (a zoo of one)."""
    model.readout_ridge_, model.readout_errors_ = ridge, {}
    if model.function_ is not None and model.probe_ is not None and len(model.ids_) > 1:
        model.readout_ridge_ = _choose_readout_ridge(model, gen)


def _set_distill_steps(model: "MetaModel", gen: torch.Generator) -> None:
    """``distill_steps_``: as given, or chosen on the zoo; 0 where there is nothing to distill
    (no function on probe inputs, or a bare vector: all readout, solved exactly), and 0 when
    not given for a zoo of one (no model to hold out)."""
    model.distill_steps_, model.distill_errors_ = 0, {}
    if model.function_ is None or model.probe_ is None or model.spec_.is_vector:
        return
    if model.distill_steps is not None:
        model.distill_steps_ = model.distill_steps
    elif len(model.ids_) > 1:
        model.distill_steps_ = _choose_distill_steps(model, gen)


@torch.no_grad()
def _simulated_devices(model: "MetaModel", gen: torch.Generator, models: int) -> tuple[Tensor, Tensor, Tensor]:
    """Up to ``models`` held-out zoo models as new devices: their leave-one-out predicted
    functions on the probe ``(q, N, out)``, the weights decoded at their leave-one-out predicted
    codes (as a new device's are decoded at its predicted code: their own fitted codes decode
    their upload, readout included, which flatters every setting that keeps the decoded
    readout), and their uploads' own functions there ``(q, N, out)``. No client data is involved."""
    fn, spec = model.function_, model.spec_
    pick = fn.loo_index_[torch.randperm(len(fn.loo_index_), generator=gen)[:models]]
    mean = fn.loo_predictions(pick, nearby=False).mean.double().reshape(len(pick), -1, spec.num_outputs)
    module = model.module_
    base = module.decode_mean(module.prior.loo_mean(module.codes.mean.detach(), pick))
    own = (fn.y_[pick] + fn.mu_).reshape(len(pick), -1, spec.num_outputs)
    return mean, base, own


def _relative_error(out: Tensor, reference: Tensor, spread_of: Tensor) -> float:
    """Mean over networks of ``|out - reference|`` relative to the spread of ``spread_of``
    ``(q, N, out)`` over the whole probe."""
    spread = (spread_of - spread_of.mean(1, keepdim=True)).norm(dim=(1, 2))
    return float(((out.double() - reference).norm(dim=(1, 2)) / spread).mean())


@torch.no_grad()
def _held_out_error(model: "MetaModel", weights: Tensor, own: Tensor) -> float:
    """Error of the networks against the uploads' own functions ``own`` ``(q, N, out)`` on the
    probe's odd inputs (the ones a simulated device's readout is not solved on)."""
    odd = slice(1, None, 2)
    return _upload_error(model, model.spec_.forward(weights, model.probe_[odd]).double(), own[:, odd])


def _solved_on_even(model: "MetaModel", base: Tensor, target: Tensor, ridge: float) -> Tensor:
    """``base`` with its readout solved for ``target`` ``(q, N, out)`` on the probe's even inputs."""
    spec, even = model.spec_, slice(0, None, 2)
    return set_readout(spec, base, solve_readout(spec, base, model.probe_[even], target[:, even], ridge)[0])


def _upload_error(model: "MetaModel", out: Tensor, own: Tensor) -> float:
    """How far networks' outputs ``(q, N, out)`` are from the uploads' own ``own``: relative
    error for values; for class logits the squared distance between the class probabilities
    (an upload's logits mean something only up to a shift per input, and those of classes it
    never saw are arbitrary)."""
    if model.likelihood == "softmax":
        return float(((out.softmax(-1) - own.softmax(-1)) ** 2).sum(-1).mean())
    return _relative_error(out, own, own)


@torch.no_grad()
def _choose_readout_ridge(model: "MetaModel", gen: torch.Generator, models: int = 256) -> float:
    """The readout's ridge, chosen on simulated devices (held-out zoo models, decoded at their
    leave-one-out codes, with their leave-one-out predicted functions): the readout is solved
    towards the prediction on every probe input but one (closed form, as ``personalize``
    solves it on all) and judged against the held-out upload at the input left out. The
    ridge weighs the GP's prediction against the decoded readout: where the prediction is
    rough (small zoos) a larger one helps, where it is sharp a smaller one. Judged against the
    prediction instead, small ridges looked best even where it was rough (bump example, 50
    devices: 1e-7 chosen, 1e-4 best for its new devices, RESULTS); judged against the upload
    from the model's own decoded weights, whose readout reproduces that upload, large ones did."""
    mean, base, own = _simulated_devices(model, gen, models)
    errors = {ridge: _upload_error(model, held_out_outputs(model.spec_, base, model.probe_, mean, ridge), own)
              for ridge in READOUT_RIDGES}
    model.readout_errors_ = errors
    return min(errors, key=lambda r: errors[r] if math.isfinite(errors[r]) else math.inf)  # a leverage of 1: unusable


def _choose_distill_steps(model: "MetaModel", gen: torch.Generator, models: int = 32) -> int:
    """How long ``personalize(distill=True)`` trains, chosen on simulated devices: each starts
    from its readout solved on the probe's even inputs, is distilled there towards its
    predicted function (one run, snapshots at each candidate count), gets its readout solved
    again as ``personalize`` does, and is judged on the odd inputs against the held-out
    upload. Distilling computes the prediction more exactly, which helps where the prediction
    is good and copies its roughness where it is not (the bump example with 50 devices: 0
    steps, where judged against the prediction itself the longest run had looked best)."""
    mean, base, own = _simulated_devices(model, gen, models)
    ridge, even = model.readout_ridge_, slice(0, None, 2)
    start = _solved_on_even(model, base, mean, ridge)
    snapshots = {0: start}
    keep = lambda step, w: snapshots.update({step: w.clone()}) if step in DISTILL_STEPS else None  # noqa: E731
    model._distilled(start, mean[:, even], model.probe_[even], max(DISTILL_STEPS), on_step=keep)
    errors = {steps: _held_out_error(model, _solved_on_even(model, snapshots[steps], mean, ridge), own)
              for steps in DISTILL_STEPS}
    model.distill_errors_ = errors
    return min(errors, key=errors.get)
