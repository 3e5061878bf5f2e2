"""The meta-model: a generative model of the zoo's weights given task descriptors.

``gamma_i ~ N(A_i m(w_0, w_i), diag A_i v(w_0, w_i))`` with the base component ``w_0``, a code
``w_i`` per task under the sparse localized GP prior over descriptors, and ``A_i`` the
function-preserving alignment of model ``i``. The fit alternates Adam on the ELBO (alignment
fixed) with re-solving every model's alignment (continuous parameters fixed):

``ELBO = sum_i E_q log p(gamma_i | A_i, m, v) + E_q log p_PIC(W | tau) + H[q(W)]
         - KL(q(w_0) || N(0, alpha^2 I))``.

Where the zoo has a function space (probe inputs, or bare vectors), a GP over descriptors in that
space (:mod:`fedfuse.function_space`, settings by leave-one-out over the zoo) predicts the new
task's function, and the decoded network's readout is solved to compute it on the probe
(:mod:`fedfuse.readout`): the decoder supplies the features, the zoo's functions the output.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributions import Normal

from fedfuse.alignment import align_zoo, apply_perms, chain_align
from fedfuse.decoder import WeightDecoder
from fedfuse.errors import FedfuseError, NotFittedError
from fedfuse.function_space import FunctionSpaceGP
from fedfuse.io import load_tensors, save_tensors
from fedfuse import architectures
from fedfuse.parallel import ParallelMap, serial_map
from fedfuse.pic import SparseLocalizedGP
from fedfuse.posterior import DecodedCodes, ReadoutGaussian, WeightPosterior
from fedfuse.progress import progress_bar
from fedfuse.readout import get_readout, readout_map, set_readout
from fedfuse.variational import DiagonalGaussian
from fedfuse.zoo import ModelZoo, check_descriptor, robust_scale

log = logging.getLogger(__name__)
FORMAT = "fedfuse.meta_model/1"


class MetaModel:
    """Fit on a :class:`ModelZoo`, then :meth:`personalize` a new task from its descriptor.

    Settings are stored as given (scikit-learn contract); everything learned ends in ``_``.
    ``pmap`` fans the per-model alignment out (serial by default; the server passes Ray's).
    ``function_space=False`` keeps the paper's decoded initializer (the ablation); ``kernel``
    picks the descriptor kernel of the function-space GP (``auto``: by leave-one-out);
    ``likelihood`` says what the outputs are (``gaussian`` values or ``softmax`` logits).
    """

    def __init__(
        self,
        *,
        code_dim: int = 8,
        base_dim: int = 8,
        hidden: tuple[int, ...] = (256, 256),
        num_inducing: int = 32,
        block_size: int = 40,
        exact_gp: bool = False,
        align: bool = True,
        max_rounds: int = 10,
        min_rounds: int = 3,
        steps_per_round: int = 250,
        gp_steps: int = 10,
        lr: float = 3e-3,
        gp_lr: float = 0.05,
        batch_size: int = 256,
        code_samples: int = 4,
        refine_weight: float = 1.0,
        refine_points: int = 64,
        tol: float = 1e-3,
        function_space: bool = True,
        kernel: str = "auto",
        readout_ridge: float = 1e-3,
        likelihood: str = "gaussian",
        seed: int = 0,
        pmap: ParallelMap | None = None,
        chunk_size: int = 64,
        progress: bool = False,
    ) -> None:
        self.code_dim = code_dim
        self.base_dim = base_dim
        self.hidden = tuple(hidden)
        self.num_inducing = num_inducing
        self.block_size = block_size
        self.exact_gp = exact_gp
        self.align = align
        self.max_rounds = max_rounds
        self.min_rounds = min_rounds
        self.steps_per_round = steps_per_round
        self.gp_steps = gp_steps
        self.lr = lr
        self.gp_lr = gp_lr
        self.batch_size = batch_size
        self.code_samples = code_samples
        self.refine_weight = refine_weight
        self.refine_points = refine_points
        self.tol = tol
        self.function_space = function_space
        self.kernel = kernel
        self.readout_ridge = readout_ridge
        self.likelihood = likelihood
        self.seed = seed
        self.pmap = pmap
        self.chunk_size = chunk_size
        self.progress = progress

    _SETTINGS = (
        "code_dim", "base_dim", "hidden", "num_inducing", "block_size", "exact_gp", "align",
        "max_rounds", "min_rounds", "steps_per_round", "gp_steps", "lr", "gp_lr", "batch_size",
        "code_samples", "refine_weight", "refine_points", "tol", "function_space", "kernel", "readout_ridge",
        "likelihood", "seed", "chunk_size",
    )

    def get_params(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self._SETTINGS}

    # -- fit ----------------------------------------------------------------------------------------
    def fit(self, zoo: ModelZoo, probe: Tensor | None = None) -> "MetaModel":
        """Fit on the zoo. ``probe`` ``(N, in)``: inputs the server generates itself (no client
        data). The zoo's functions there are what new tasks' functions are predicted from; on
        the first ``refine_points`` of them each decoded model is also matched to its original's
        outputs (the refinement of Sec. 3.4.2, weighted by ``refine_weight``). ``None``: the
        paper's weight-space model alone (bare vectors are their own function space)."""
        zoo.validate()
        start = time.perf_counter()
        torch.manual_seed(self.seed)
        pmap = self.pmap or serial_map
        n, spec = len(zoo), zoo.spec
        self.spec_, self.ids_ = spec, list(zoo.ids)
        loc, scale = robust_scale(zoo.tau)
        self.tau_loc_, self.tau_scale_ = loc.float(), scale.float()
        tau = self._normalize(zoo.tau)
        gamma = zoo.weights

        self.perms_ = (
            chain_align(spec, gamma, tau, pmap, self.chunk_size)
            if self.align
            else [torch.arange(h).repeat(n, 1) for h in spec.perm_sizes]
        )
        aligned = apply_perms(spec, gamma, self.perms_)
        targets = None
        if probe is not None and not spec.is_vector:
            refine = probe[: self.refine_points].float()
            with torch.no_grad():  # (n, N, out), permutation invariant; chunked for large zoos
                out = torch.cat([spec.forward(g, refine) for g in gamma.split(1024)])
            scale = out.var(dim=(1, 2), keepdim=True, unbiased=False).clamp_min(1e-6)
            targets = (refine, out, scale)

        self.gp_ = SparseLocalizedGP(
            tau, self.code_dim, self.num_inducing, self.block_size, exact=self.exact_gp,
            seed=self.seed,
        )
        self.codes_ = DiagonalGaussian(n, self.code_dim)
        with torch.no_grad():
            self.codes_.loc.copy_(_pca_scores(aligned, self.code_dim))
        self.base_ = DiagonalGaussian(self.base_dim)
        self.log_alpha_ = nn.Parameter(torch.zeros(()))
        self.decoder_ = WeightDecoder(self.base_dim + self.code_dim, spec.num_weights, self.hidden)
        self.decoder_.init_output(aligned.mean(0), aligned.var(0, unbiased=False) + 1e-4)
        params = [*self.decoder_.parameters(), *self.codes_.parameters(),
                  *self.base_.parameters(), self.log_alpha_]
        opt = torch.optim.Adam(params, lr=self.lr)
        # the hyperparameters need far larger steps than the decoder: at ``lr`` they barely
        # leave their initial lengthscale and the predictive mean shrinks to the zoo average
        gp_opt = torch.optim.Adam(self.gp_.parameters(), lr=self.gp_lr)
        gen = torch.Generator().manual_seed(self.seed)

        self.history_: list[dict[str, float]] = []
        prev = None
        with progress_bar(self.progress, "fitting meta-model", total=self.max_rounds) as bar:
            for rnd in range(self.max_rounds):
                # coordinate ascent: the GP hyperparameters appear only in the prior term, so
                # they move in a few steps of their own, and the codes see a frozen factorization
                self.gp_.freeze()
                for _ in range(self.steps_per_round):
                    batch = torch.randperm(n, generator=gen)[: min(n, self.batch_size)]
                    opt.zero_grad()
                    loss = -self._elbo(aligned, batch, targets=targets, frozen=True)
                    loss.backward()
                    opt.step()
                mean, var = self.codes_.mean.detach(), self.codes_.variance.detach()
                for _ in range(self.gp_steps):
                    gp_opt.zero_grad()
                    (-self.gp_.expected_log_prob(mean, var)).backward()
                    gp_opt.step()
                with torch.no_grad():
                    elbo = float(self._elbo(aligned, torch.arange(n), generator=gen))
                changed = 0.0
                if self.align:
                    new = self._realign(gamma, pmap, gen)
                    moved = torch.zeros(n, dtype=torch.bool)
                    for old, p in zip(self.perms_, new):
                        moved |= (old != p).any(1)
                    changed = float(moved.float().mean())
                    self.perms_ = new
                    aligned = apply_perms(spec, gamma, new)
                self.history_.append({"round": rnd, "elbo": elbo, "changed": changed})
                bar.update(description=f"fitting meta-model (ELBO {elbo:.4g}, realigned {changed:.0%})")
                rel = math.inf if prev is None else abs(elbo - prev) / max(abs(prev), 1.0)
                prev = elbo
                if rnd + 1 >= self.min_rounds and changed == 0.0 and rel < self.tol:
                    break
        self.n_rounds_ = len(self.history_)
        self.gp_.condition(self.codes_.mean.detach())
        self._fit_function_space(zoo, probe, gen)
        self.fit_seconds_ = time.perf_counter() - start
        log.info("fit %d models in %.1fs (%d rounds)", n, self.fit_seconds_, self.n_rounds_)
        return self

    def _signatures(self, weights: Tensor) -> Tensor | None:
        """Each model's function on the probe ``(n, N * out)``, its weights if it is a bare
        vector, ``None`` when there is no function space to work in."""
        if self.probe_ is None:
            return weights if self.spec_.is_vector else None
        with torch.no_grad():
            return torch.cat([self.spec_.forward(w, self.probe_).flatten(1) for w in weights.split(1024)])

    def _fit_function_space(self, zoo: ModelZoo, probe: Tensor | None, gen: torch.Generator) -> None:
        if self.likelihood not in ("gaussian", "softmax"):
            raise FedfuseError(f"likelihood={self.likelihood!r}: use 'gaussian' (outputs are values) "
                               "or 'softmax' (outputs are class logits)")
        self.probe_ = None if probe is None else probe.float()
        signatures = self._signatures(zoo.weights) if self.function_space else None
        self.function_ = None if signatures is None else FunctionSpaceGP(
            kernel=self.kernel, seed=self.seed).fit(zoo.tau, signatures)
        self.readout_ridge_ = self.readout_ridge
        if self.function_ is not None and self.probe_ is not None:
            self._choose_readout_ridge(zoo, gen)

    @torch.no_grad()
    def _choose_readout_ridge(self, zoo: ModelZoo, gen: torch.Generator, models: int = 96) -> None:
        """The readout's ridge, chosen on simulated devices: a held-out zoo model is the truth,
        its leave-one-out prediction the target, solved on every other probe input and judged on
        the rest against the held-out model's own outputs. No client data is involved."""
        fn, n_out = self.function_, self.spec_.num_outputs
        pick = fn.loo_index_[torch.randperm(len(fn.loo_index_), generator=gen)[:models]]
        mean, _ = fn.loo_predictions(pick)
        truth = self._signatures(zoo.weights[pick]).double().reshape(len(pick), -1, n_out)
        spread = (truth - truth.mean(1, keepdim=True)).norm(dim=(1, 2))
        base = self.reconstruct()[pick]
        fit_half, test_half = torch.arange(0, len(self.probe_), 2), torch.arange(1, len(self.probe_), 2)
        target = mean.reshape(len(pick), -1, n_out)[:, fit_half]
        errors = {}
        for ridge in (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7):
            a, b = readout_map(self.spec_, base, self.probe_[fit_half], ridge)
            tuned = set_readout(self.spec_, base, a @ target + b @ get_readout(self.spec_, base).double())
            out = self.spec_.forward(tuned, self.probe_[test_half]).double()
            errors[ridge] = float(((out - truth[:, test_half]).norm(dim=(1, 2)) / spread).mean())
        self.readout_ridge_ = min(errors, key=errors.get)

    def _readout_prior(self, base: Tensor, mean: Tensor, scale: Tensor) -> tuple[Tensor, ReadoutGaussian]:
        """Weights with the readout solved to compute the predicted functions ``mean`` on the
        probe, and the Gaussian over readouts that the function-space predictive maps to."""
        fn, spec = self.function_, self.spec_
        q = base.shape[0]
        if spec.is_vector and self.probe_ is None:  # the vector is its own signature
            factor = scale[:, None, None] * fn.basis_.float().T  # (q, d, r)
            diag = scale[:, None] ** 2 * fn.residual_.float()
            return mean, ReadoutGaussian(mean, factor, diag)
        n_out = spec.num_outputs
        a, b = readout_map(spec, base, self.probe_, self.readout_ridge_)  # (q, h+1, N), (q, h+1, h+1)
        target = mean.double().reshape(q, -1, n_out)
        readout = a @ target + b @ get_readout(spec, base).double()
        basis = fn.basis_.reshape(fn.basis_.shape[0], -1, n_out)  # (r, N, out)
        factor = torch.einsum("qhn,rnc->qhcr", a, basis) * scale.double()[:, None, None, None]
        diag = torch.einsum("qhn,nc->qhc", a**2, fn.residual_.reshape(-1, n_out)) * scale.double()[:, None, None] ** 2
        p = readout.shape[1] * n_out
        weights = base.clone()
        weights[:, spec.readout_index.flatten()] = readout.reshape(q, p).float()
        return weights, ReadoutGaussian(readout.reshape(q, p).float(), factor.reshape(q, p, -1).float(),
                                        diag.reshape(q, p).float())

    def _normalize(self, tau: Tensor) -> Tensor:
        return (tau - self.tau_loc_) / self.tau_scale_

    def _elbo(self, aligned: Tensor, batch: Tensor, generator: torch.Generator | None = None,
              targets: tuple[Tensor, Tensor, Tensor] | None = None, frozen: bool = False) -> Tensor:
        """Single-sample reparameterized ELBO; the likelihood of a mini-batch is scaled to ``n``.
        With ``targets`` the function-space matching penalty is subtracted (training only)."""
        n = aligned.shape[0]
        codes = self.codes_.loc[batch] + self.codes_.scale[batch] * torch.randn(
            len(batch), self.code_dim, generator=generator
        )
        base = self.base_.loc + self.base_.scale * torch.randn(self.base_dim, generator=generator)
        mean, var = self.decoder_(torch.cat([base.expand(len(batch), -1), codes], 1))
        loglik = Normal(mean, var.sqrt()).log_prob(aligned[batch]).sum() * (n / len(batch))
        prior_fn = self.gp_.frozen_expected_log_prob if frozen else self.gp_.expected_log_prob
        prior = prior_fn(self.codes_.mean, self.codes_.variance).float()
        alpha = self.log_alpha_.exp()
        kl_base = self.base_.kl_to(Normal(torch.zeros(()), alpha))
        elbo = loglik + prior + self.codes_.entropy() - kl_base
        if targets is None:
            return elbo
        probe, out, scale = targets
        mismatch = ((self.spec_.forward(mean, probe) - out[batch]) ** 2 / scale[batch]).mean(dim=(1, 2))
        penalty = self.refine_weight * self.spec_.num_weights * mismatch.sum() * (n / len(batch))
        return elbo - penalty

    @torch.no_grad()
    def _realign(self, gamma: Tensor, pmap: ParallelMap, gen: torch.Generator) -> list[Tensor]:
        """Re-solve all assignments against each model's own decoded Gaussian, averaged over
        ``code_samples`` draws from ``q`` (the expectation in the cost)."""
        n, s = gamma.shape[0], self.code_samples
        base = self.base_.loc + self.base_.scale * torch.randn(s, 1, self.base_dim, generator=gen)
        codes = self.codes_.loc + self.codes_.scale * torch.randn(s, n, self.code_dim, generator=gen)
        mean, var = self.decoder_(torch.cat([base.expand(s, n, -1), codes], -1))
        return align_zoo(self.spec_, gamma, mean.transpose(0, 1), var.transpose(0, 1),
                         self.perms_, pmap, self.chunk_size)

    # -- use ----------------------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not hasattr(self, "decoder_"):
            raise NotFittedError("this MetaModel is not fitted yet: call fit(zoo) or load(path) first")

    @property
    def tau_dim(self) -> int:
        self._check_fitted()
        return self.tau_loc_.numel()

    @torch.no_grad()
    def personalize(self, tau: Tensor | list[float], features: Tensor | None = None) -> WeightPosterior:
        """Initializer for new task(s) from descriptors alone: ``(D,)`` or ``(q, D)``.
        ``features`` ``(q, d)``: networks whose hidden layers carry the readout instead of the
        decoded ones (e.g. a device's own pre-trained model)."""
        self._check_fitted()
        t = check_descriptor(tau, self.tau_dim)
        code_mean, code_var = self.gp_.predict(self._normalize(t))
        q = t.shape[0]
        decoded, _ = self.decoder_(torch.cat([self.base_.loc.expand(q, -1), code_mean], 1))
        if features is not None:
            self.spec_.check_flat(features)
            decoded = features.float().reshape(q, -1)
        if self.function_ is None:
            prior = (self.gp_.kernel.outputscale + self.gp_.noise).float()
            ratio = (code_var / prior).mean(-1).clamp(0, 1)
            codes = DecodedCodes(self.decoder_, self.base_.loc.detach(), self.base_.scale.detach(),
                                 code_mean, code_var)
            return WeightPosterior(self.spec_, decoded, code_loc=code_mean, code_variance=code_var,
                                   uncertainty=ratio, novelty=ratio, decoded=codes, seed=self.seed)
        pred = self.function_.predict(t)
        weights, readout = self._readout_prior(decoded, pred.mean, pred.scale)
        uncertainty = pred.expected_error
        if self.likelihood == "softmax":  # the expected share of probe inputs it misclassifies
            probs = torch.softmax(pred.mean.reshape(q, -1, self.spec_.num_outputs), -1)
            uncertainty = 1 - probs.max(-1).values.mean(1)
        return WeightPosterior(self.spec_, weights, code_loc=code_mean, code_variance=code_var,
                               uncertainty=uncertainty, novelty=pred.novelty, readout=readout,
                               seed=self.seed)

    @torch.no_grad()
    def decode(self, tau: Tensor | list[float]) -> Tensor:
        """The paper's initializer ``m([E w_0; E w*])``: the decoder at the PIC predictive code,
        without the function-space readout (kept for comparison)."""
        self._check_fitted()
        t = check_descriptor(tau, self.tau_dim)
        code, _ = self.gp_.predict(self._normalize(t))
        return self.decoder_(torch.cat([self.base_.loc.expand(t.shape[0], -1), code], 1))[0]

    @torch.no_grad()
    def reconstruct(self, own_readout: bool = False) -> Tensor:
        """Decoded weights of the training tasks at their codes' means, in canonical order; with
        ``own_readout`` each readout is solved for that model's own function on the probe (how
        well the decoded features carry the uploaded models)."""
        self._check_fitted()
        n = self.codes_.loc.shape[0]
        mean, _ = self.decoder_(torch.cat([self.base_.loc.expand(n, -1), self.codes_.loc], 1))
        if own_readout and self.function_ is not None:
            own = (self.function_.y_ + self.function_.mu_).float()
            mean, _ = self._readout_prior(mean, own, torch.zeros(n))
        return mean

    # -- persistence --------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """One safetensors file: every tensor plus a JSON header (settings, spec, ids, history)."""
        self._check_fitted()
        tensors: dict[str, Tensor] = {"tau_loc": self.tau_loc_, "tau_scale": self.tau_scale_,
                                      "log_alpha": self.log_alpha_.detach()}
        for prefix, module in (("decoder", self.decoder_), ("gp", self.gp_),
                               ("codes", self.codes_), ("base", self.base_)):
            tensors |= {f"{prefix}.{k}": v for k, v in module.state_dict().items()}
        for li, p in enumerate(self.perms_):
            tensors[f"perms.{li}"] = p.to(torch.int32)
        meta = {"format": FORMAT, "settings": self.get_params(), "spec": self.spec_.to_dict(),
                "ids": self.ids_, "history": self.history_, "readout_ridge": self.readout_ridge_,
                "annotations": getattr(self, "annotations_", {})}
        if self.probe_ is not None:
            tensors["probe"] = self.probe_
        if self.function_ is not None:
            fn_tensors, meta["function"] = self.function_.state()
            tensors |= {f"function.{k}": v for k, v in fn_tensors.items()}
        save_tensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | os.PathLike, pmap: ParallelMap | None = None) -> "MetaModel":
        tensors, meta = load_tensors(path)
        if meta.get("format") != FORMAT:
            raise FedfuseError(f"{path} holds {meta.get('format')!r}, not a meta-model ({FORMAT})")
        settings = meta["settings"]
        settings["hidden"] = tuple(settings["hidden"])
        self = cls(**settings, pmap=pmap)
        self.spec_, self.ids_, self.history_ = architectures.from_dict(meta["spec"]), meta["ids"], meta["history"]
        self.annotations_ = meta.get("annotations", {})
        self.n_rounds_ = len(self.history_)
        self.tau_loc_, self.tau_scale_ = tensors["tau_loc"], tensors["tau_scale"]
        self.log_alpha_ = nn.Parameter(tensors["log_alpha"])
        part = lambda prefix: {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        n = len(self.ids_)
        self.gp_ = SparseLocalizedGP.from_state(part("gp"), self.exact_gp)
        self.codes_ = DiagonalGaussian(n, self.code_dim)
        self.codes_.load_state_dict(part("codes"))
        self.base_ = DiagonalGaussian(self.base_dim)
        self.base_.load_state_dict(part("base"))
        self.decoder_ = WeightDecoder(self.base_dim + self.code_dim, self.spec_.num_weights, self.hidden)
        self.decoder_.load_state_dict(part("decoder"))
        self.perms_ = [tensors[f"perms.{li}"].long() for li in range(len(self.spec_.perm_sizes))]
        self.gp_.condition(self.codes_.mean.detach())
        self.probe_ = tensors.get("probe")
        self.readout_ridge_ = meta["readout_ridge"]
        self.function_ = (FunctionSpaceGP.from_state(part("function"), meta["function"])
                          if "function" in meta else None)
        return self


def _pca_scores(x: Tensor, k: int) -> Tensor:
    """Top-``k`` principal component scores of the rows of ``x``, unit variance per column:
    a start for the codes that already orders tasks by how their weights differ."""
    centred = x - x.mean(0)
    k_eff = min(k, *centred.shape)
    u, s, _ = torch.linalg.svd(centred, full_matrices=False)
    scores = torch.zeros(x.shape[0], k)
    scores[:, :k_eff] = u[:, :k_eff] * math.sqrt(x.shape[0])
    return scores
