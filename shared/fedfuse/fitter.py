"""The rounds that fit a :class:`~fedfuse.meta_model.MetaModel` to a zoo.

Coordinate ascent: Adam steps on the ELBO (decoder, codes, base) with the prior factored once at
fixed hyperparameters; a few steps on the prior's hyperparameters alone (they enter only the
prior term); then every model's alignment re-solved (independent per model, fanned out). Stop
on a tolerance, not a fixed count. Then the function-space GP over the zoo and the readout's
ridge, both chosen on the zoo alone (leave-one-out).
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
from fedfuse.readout import get_readout, readout_map, set_readout
from fedfuse.zoo import ModelZoo, robust_scale

if TYPE_CHECKING:
    from fedfuse.meta_model import MetaModel, ZooModel

log = logging.getLogger(__name__)
Targets = tuple[Tensor, Tensor, Tensor]  # refinement probe, the zoo's outputs there, their scale


def fit(model: "MetaModel", zoo: ModelZoo, probe: Tensor | None) -> "MetaModel":
    zoo.validate()
    if model.likelihood not in ("gaussian", "softmax"):
        raise FedfuseError(f"likelihood={model.likelihood!r}: use 'gaussian' (outputs are values) "
                           "or 'softmax' (outputs are class logits)")
    start = time.perf_counter()
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
    model.history_ = _rounds(model, gamma, aligned, targets, pmap, gen)
    model.n_rounds_ = len(model.history_)
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
            gen: torch.Generator) -> list[dict[str, float]]:
    module: ZooModel = model.module_
    n = gamma.shape[0]
    opt = torch.optim.Adam(module.variational_parameters(), lr=model.lr)
    # the hyperparameters need far larger steps than the decoder: at ``lr`` they barely leave
    # their initial lengthscale and the predictive mean shrinks to the zoo average
    gp_opt = torch.optim.Adam(module.prior.parameters(), lr=model.gp_lr)
    history: list[dict[str, float]] = []
    prev = None
    with progress_bar(model.progress, "fitting meta-model", total=model.max_rounds) as bar:
        for rnd in range(model.max_rounds):
            frozen = module.prior.frozen()
            for _ in range(model.steps_per_round):
                batch = torch.randperm(n, generator=gen)[: min(n, model.batch_size)]
                opt.zero_grad()
                loss = -module.elbo(aligned, batch, frozen, targets=targets, refine_weight=model.refine_weight)
                loss.backward()
                opt.step()
            mean, var = module.codes.mean.detach(), module.codes.variance.detach()
            for _ in range(model.gp_steps):
                gp_opt.zero_grad()
                (-module.prior.expected_log_prob(mean, var)).backward()
                gp_opt.step()
            with torch.no_grad():
                elbo = float(module.elbo(aligned, torch.arange(n), module.prior, generator=gen))
            changed = 0.0
            if model.align:
                mean_s, var_s = module.sample_decoded(model.code_samples, gen)
                new = align_zoo(model.spec_, gamma, mean_s, var_s, model.perms_, pmap, model.chunk_size)
                moved = torch.zeros(n, dtype=torch.bool)
                for old, p in zip(model.perms_, new):
                    moved |= (old != p).any(1)
                changed = float(moved.float().mean())
                model.perms_ = new
                aligned = apply_perms(model.spec_, gamma, new)
            history.append({"round": rnd, "elbo": elbo, "changed": changed})
            bar.update(description=f"fitting meta-model (ELBO {elbo:.4g}, realigned {changed:.0%})")
            rel = math.inf if prev is None else abs(elbo - prev) / max(abs(prev), 1.0)
            prev = elbo
            if rnd + 1 >= model.min_rounds and changed == 0.0 and rel < model.tol:
                break
    return history


def _fit_function_space(model: "MetaModel", zoo: ModelZoo, probe: Tensor | None, gen: torch.Generator) -> None:
    signatures = model._signatures(zoo.weights) if model.function_space else None
    model.function_ = None if signatures is None else FunctionSpaceGP(kernel=model.kernel, seed=model.seed).fit(
        zoo.tau, signatures, weights=torch.tensor(zoo.n_examples, dtype=torch.float64))
    model.readout_ridge_ = model.readout_ridge
    if model.function_ is not None and model.probe_ is not None:
        model.readout_ridge_ = _choose_readout_ridge(model, zoo, gen)


@torch.no_grad()
def _choose_readout_ridge(model: "MetaModel", zoo: ModelZoo, gen: torch.Generator, models: int = 96) -> float:
    """The readout's ridge, chosen on simulated devices: a held-out zoo model is the truth, its
    leave-one-out prediction the target, solved on every other probe input and judged on the
    rest against the held-out model's own outputs. No client data is involved."""
    fn, spec, probe = model.function_, model.spec_, model.probe_
    n_out = spec.num_outputs
    pick = fn.loo_index_[torch.randperm(len(fn.loo_index_), generator=gen)[:models]]
    mean, _ = fn.loo_predictions(pick)
    truth = model._signatures(zoo.weights[pick]).double().reshape(len(pick), -1, n_out)
    spread = (truth - truth.mean(1, keepdim=True)).norm(dim=(1, 2))
    base = model.reconstruct()[pick]
    fit_half, test_half = torch.arange(0, len(probe), 2), torch.arange(1, len(probe), 2)
    target = mean.reshape(len(pick), -1, n_out)[:, fit_half]
    errors = {}
    for ridge in (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7):
        a, b = readout_map(spec, base, probe[fit_half], ridge)
        tuned = set_readout(spec, base, a @ target + b @ get_readout(spec, base).double())
        out = spec.forward(tuned, probe[test_half]).double()
        errors[ridge] = float(((out - truth[:, test_half]).norm(dim=(1, 2)) / spread).mean())
    return min(errors, key=errors.get)
