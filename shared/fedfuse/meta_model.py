"""The meta-model: a generative model of the zoo's weights given task descriptors.

``gamma_i ~ N(A_i m(w_0, w_i), diag A_i v(w_0, w_i))`` with the base component ``w_0``, a code
``w_i`` per task under the sparse localized GP prior over descriptors, and ``A_i`` the
function-preserving alignment of model ``i``. The fit alternates Adam on the ELBO (alignment
fixed) with re-solving every model's alignment (continuous parameters fixed):

``ELBO = sum_i E_q log p(gamma_i | A_i, m, v) + E_q log p_PIC(W | tau) + H[q(W)]
         - KL(q(w_0) || N(0, alpha^2 I))``.
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
from fedfuse.io import load_tensors, save_tensors
from fedfuse.layout import MLPSpec
from fedfuse.parallel import ParallelMap, serial_map
from fedfuse.pic import SparseLocalizedGP
from fedfuse.posterior import WeightPosterior
from fedfuse.progress import progress_bar
from fedfuse.variational import DiagonalGaussian
from fedfuse.zoo import ModelZoo, check_descriptor

log = logging.getLogger(__name__)
FORMAT = "fedfuse.meta_model/1"


class MetaModel:
    """Fit on a :class:`ModelZoo`, then :meth:`personalize` a new task from its descriptor.

    Settings are stored as given (scikit-learn contract); everything learned ends in ``_``.
    ``pmap`` fans the per-model alignment out (serial by default; the server passes Ray's).
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
        tol: float = 1e-3,
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
        self.tol = tol
        self.seed = seed
        self.pmap = pmap
        self.chunk_size = chunk_size
        self.progress = progress

    _SETTINGS = (
        "code_dim", "base_dim", "hidden", "num_inducing", "block_size", "exact_gp", "align",
        "max_rounds", "min_rounds", "steps_per_round", "gp_steps", "lr", "gp_lr", "batch_size", "code_samples", "refine_weight", "tol",
        "seed", "chunk_size",
    )

    def get_params(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self._SETTINGS}

    # -- fit ----------------------------------------------------------------------------------------
    def fit(self, zoo: ModelZoo, probe: Tensor | None = None) -> "MetaModel":
        """Fit on the zoo. ``probe`` ``(N, in)``: inputs the server generates itself (no client
        data) on which each decoded model is also matched to its original's outputs (the
        refinement of Sec. 3.4.2, weighted by ``refine_weight``); ``None`` skips it."""
        zoo.validate()
        if probe is not None and zoo.spec.is_vector:
            raise FedfuseError("a bare weight vector has no function to probe; pass probe=None")
        start = time.perf_counter()
        torch.manual_seed(self.seed)
        pmap = self.pmap or serial_map
        n, spec = len(zoo), zoo.spec
        self.spec_, self.ids_ = spec, list(zoo.ids)
        self.tau_loc_ = zoo.tau.mean(0)
        scale = zoo.tau.std(0, unbiased=False)
        self.tau_scale_ = torch.where(scale > 1e-8, scale, torch.ones_like(scale))
        tau = self._normalize(zoo.tau)
        gamma = zoo.weights

        self.perms_ = (
            chain_align(spec, gamma, tau, pmap, self.chunk_size)
            if self.align
            else [torch.arange(h).repeat(n, 1) for h in spec.hidden_sizes]
        )
        aligned = apply_perms(spec, gamma, self.perms_)
        targets = None
        if probe is not None:
            with torch.no_grad():  # (n, N, out), permutation invariant; chunked for large zoos
                out = torch.cat([spec.forward(g, probe.float()) for g in gamma.split(1024)])
            scale = out.var(dim=(1, 2), keepdim=True, unbiased=False).clamp_min(1e-6)
            targets = (probe.float(), out, scale)

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
        self.fit_seconds_ = time.perf_counter() - start
        log.info("fit %d models in %.1fs (%d rounds)", n, self.fit_seconds_, self.n_rounds_)
        return self

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
    def personalize(self, tau: Tensor | list[float]) -> WeightPosterior:
        """Initializer for new task(s) from descriptors alone: ``(D,)`` or ``(q, D)``."""
        self._check_fitted()
        t = check_descriptor(tau, self.tau_dim)
        mean, var = self.gp_.predict(self._normalize(t))
        prior = (self.gp_.kernel.outputscale + self.gp_.noise).float()
        return WeightPosterior(self.spec_, self.decoder_, self.base_.loc, self.base_.scale, mean, var,
                               prior_code_var=prior)

    @torch.no_grad()
    def reconstruct(self) -> Tensor:
        """Decoded weights of the training tasks at their codes' means, in canonical order."""
        self._check_fitted()
        n = self.codes_.loc.shape[0]
        mean, _ = self.decoder_(torch.cat([self.base_.loc.expand(n, -1), self.codes_.loc], 1))
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
                "ids": self.ids_, "history": self.history_}
        save_tensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | os.PathLike, pmap: ParallelMap | None = None) -> "MetaModel":
        tensors, meta = load_tensors(path)
        if meta.get("format") != FORMAT:
            raise FedfuseError(f"{path} holds {meta.get('format')!r}, not a meta-model ({FORMAT})")
        settings = meta["settings"]
        settings["hidden"] = tuple(settings["hidden"])
        self = cls(**settings, pmap=pmap)
        self.spec_, self.ids_, self.history_ = MLPSpec.from_dict(meta["spec"]), meta["ids"], meta["history"]
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
        self.perms_ = [tensors[f"perms.{li}"].long() for li in range(self.spec_.num_hidden_layers)]
        self.gp_.condition(self.codes_.mean.detach())
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
