"""The meta-model: a generative model of the zoo's weights given task descriptors.

``gamma_i ~ N(A_i m(w_0, w_i), diag A_i v(w_0, w_i))`` with the base component ``w_0``, a code
``w_i`` per task under the sparse localized GP prior over descriptors, and ``A_i`` the
function-preserving alignment of model ``i``. The fit alternates Adam on the ELBO (alignment
fixed) with re-solving every model's alignment (continuous parameters fixed):

``ELBO = sum_i E_q log p(gamma_i | A_i, m, v) + E_q log p_PIC(W | tau) + H[q(W)]
         - KL(q(w_0) || N(0, alpha^2 I))``.

:class:`ZooModel` holds that model and computes its ELBO; :mod:`fedfuse.fitter` runs the
rounds; :class:`MetaModel` is the estimator (settings, fit, personalize, save and load).

Where the zoo has a function space (probe inputs, or bare vectors), a GP over descriptors in that
space (:mod:`fedfuse.function_space`, settings by leave-one-out over the zoo) predicts the new
task's function, and the decoded network's readout is solved to compute it on the probe
(:mod:`fedfuse.readout`): the decoder supplies the features, the zoo's functions the output.
"""

from __future__ import annotations

import inspect
import math
import os
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.distributions import Normal

from fedfuse import architectures, fitter
from fedfuse.architectures import Architecture
from fedfuse.decoder import WeightDecoder
from fedfuse.errors import ArchitectureError, FedfuseError, NotFittedError
from fedfuse.function_space import FunctionPrediction, FunctionSpaceGP
from fedfuse.io import load_tensors, save_tensors
from fedfuse.parallel import ParallelMap
from fedfuse.pic import FrozenPrior, SparseLocalizedGP
from fedfuse.posterior import DecodedCodes, ReadoutGaussian, WeightPosterior
from fedfuse.readout import set_readout, solve_readout
from fedfuse.training import train_networks
from fedfuse.variational import DiagonalGaussian
from fedfuse.zoo import ModelZoo, check_descriptor

FORMAT = "fedfuse.meta_model/4"  # /3: the readout prior's nearby covariance; /4: distillation's step count
# a /2 fit loads with the shared covariance, /2 and /3 fits without distillation (0 steps)
READABLE = ("fedfuse.meta_model/2", "fedfuse.meta_model/3", FORMAT)
DISTILL_LR = 1e-3  # Adam's step for distillation: the start already computes the function closely


class ZooModel(nn.Module):
    """The generative model of the zoo's (aligned) weights given the descriptors: the decoder
    ``(m, v)``, one variational code per task under the PIC prior, the base component with its
    learned prior scale ``alpha``, and the ELBO they define."""

    def __init__(self, spec: Architecture, n: int, code_dim: int, base_dim: int, hidden: tuple[int, ...],
                 prior: SparseLocalizedGP) -> None:
        super().__init__()
        self.spec = spec
        self.prior = prior
        self.codes = DiagonalGaussian(n, code_dim)
        self.base = DiagonalGaussian(base_dim)
        self.log_alpha = nn.Parameter(torch.zeros(()))
        self.decoder = WeightDecoder(base_dim + code_dim, spec.num_weights, hidden)

    @torch.no_grad()
    def start(self, aligned: Tensor, code_dim: int) -> None:
        """Codes at the zoo's principal components, decoder at its mean and variance: early
        steps then learn structure, not offsets."""
        self.codes.loc.copy_(_pca_scores(aligned, code_dim))
        self.decoder.init_output(aligned.mean(0), aligned.var(0, unbiased=False) + 1e-4)

    def variational_parameters(self) -> list[nn.Parameter]:
        return [*self.decoder.parameters(), *self.codes.parameters(), *self.base.parameters(), self.log_alpha]

    def decode(self, codes: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance of the weights at codes ``(..., e)`` and the base component's mean."""
        return self.decoder(self._decoder_input(codes))

    def decode_mean(self, codes: Tensor) -> Tensor:
        """The weights' mean alone at codes ``(..., e)``."""
        return self.decoder.mean(self._decoder_input(codes))

    def _decoder_input(self, codes: Tensor) -> Tensor:
        return torch.cat([self.base.loc.expand(*codes.shape[:-1], -1), codes], -1)

    @torch.no_grad()
    def sample_decoded(self, samples: int, gen: torch.Generator, index: Tensor | slice = slice(None)
                       ) -> tuple[Tensor, Tensor]:
        """The ``index``ed models' decoded Gaussians under ``samples`` draws from ``q`` (the
        expectation in the alignment cost): ``(n, S, d)`` means and variances."""
        loc, scale = self.codes.loc[index], self.codes.scale[index]
        n = loc.shape[0]
        base = self.base.loc + self.base.scale * torch.randn(samples, 1, self.base.loc.shape[-1], generator=gen)
        codes = loc + scale * torch.randn(samples, *loc.shape, generator=gen)
        mean, var = self.decoder(torch.cat([base.expand(samples, n, -1), codes], -1))
        return mean.transpose(0, 1), var.transpose(0, 1)

    def elbo(self, aligned: Tensor, batch: Tensor, prior: SparseLocalizedGP | FrozenPrior,
             generator: torch.Generator | None = None, targets: tuple[Tensor, Tensor, Tensor] | None = None,
             refine_weight: float = 1.0) -> Tensor:
        """Single-sample reparameterized ELBO; a mini-batch's likelihood is scaled to ``n``.
        ``prior`` is the PIC prior or its factorization frozen at the current hyperparameters.
        With ``targets`` the function-space matching penalty is subtracted (training only)."""
        n = aligned.shape[0]
        codes = self.codes.loc[batch] + self.codes.scale[batch] * torch.randn(
            len(batch), self.codes.loc.shape[-1], generator=generator)
        base = self.base.loc + self.base.scale * torch.randn(self.base.loc.shape, generator=generator)
        mean, var = self.decoder(torch.cat([base.expand(len(batch), -1), codes], 1))
        loglik = Normal(mean, var.sqrt()).log_prob(aligned[batch]).sum() * (n / len(batch))
        prior_term = prior.expected_log_prob(self.codes.mean, self.codes.variance).float()
        kl_base = self.base.kl_to(Normal(torch.zeros(()), self.log_alpha.exp()))
        elbo = loglik + prior_term + self.codes.entropy() - kl_base
        if targets is None:
            return elbo
        probe, out, scale = targets
        mismatch = ((self.spec.forward(mean, probe) - out[batch]) ** 2 / scale[batch]).mean(dim=(1, 2))
        return elbo - refine_weight * self.spec.num_weights * mismatch.sum() * (n / len(batch))

    @torch.no_grad()
    def condition(self) -> None:
        """Cache the prior's predictive at the fitted codes."""
        self.prior.condition(self.codes.mean.detach())


class MetaModel:
    """Fit on a :class:`ModelZoo`, then :meth:`personalize` a new task from its descriptor.

    Settings are stored as given and read back from the signature (scikit-learn's
    ``get_params`` contract); everything learned ends in ``_``. ``pmap`` fans the per-model
    alignment out (serial by default; the server passes Ray's). ``gp_blocks``: how many random
    PIC blocks each hyperparameter step sees (their sums rescaled to the whole prior; ``None``:
    all): a step then costs the same at any ``n``, and zoos of up to ``gp_blocks`` blocks (about
    2,500 models at 40 per block) take every block, as a full step does. ``function_space=False`` keeps
    the paper's decoded initializer (the ablation); ``kernel`` picks the descriptor kernel of the
    function-space GP (``auto``: by leave-one-out); ``distill_steps``: how long
    ``personalize(distill=True)`` trains every weight towards the predicted function on the
    probe (``None``: chosen on the zoo's simulated devices; ``distill_steps_`` is ``None`` only
    for a fit loaded from a file older than distillation, which then distills nothing until
    refitted); ``likelihood`` says what the outputs are
    (``gaussian`` values or ``softmax`` logits). ``refit_*`` govern :meth:`fit` with a
    ``previous`` model: how many joint rounds an incremental refit runs, and the drift (share of
    new models, their error under the previous fit) beyond which it refits in full.
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
        gp_blocks: int | None = 64,
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
        distill_steps: int | None = None,
        likelihood: str = "gaussian",
        refit_rounds: int = 1,
        refit_drift: float = 0.2,
        refit_drift_error: float = 3.0,
        seed: int = 0,
        chunk_size: int = 64,
        pmap: ParallelMap | None = None,
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
        self.gp_blocks = gp_blocks
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
        self.distill_steps = distill_steps
        self.likelihood = likelihood
        self.refit_rounds = refit_rounds
        self.refit_drift = refit_drift
        self.refit_drift_error = refit_drift_error
        self.seed = seed
        self.chunk_size = chunk_size
        self.pmap = pmap
        self.progress = progress

    _RUNTIME = ("pmap", "progress")  # how to run, not what to fit: not saved

    def get_params(self) -> dict[str, Any]:
        names = inspect.signature(type(self).__init__).parameters
        return {k: getattr(self, k) for k in names if k != "self" and k not in self._RUNTIME}

    def fit(self, zoo: ModelZoo, probe: Tensor | None = None, previous: "MetaModel | None" = None) -> "MetaModel":
        """Fit on the zoo. ``probe`` ``(N, in)``: inputs the server generates itself (no client
        data). The zoo's functions there are what new tasks' functions are predicted from; on
        the first ``refine_points`` of them each decoded model is also matched to its original's
        outputs (the refinement of Sec. 3.4.2, weighted by ``refine_weight``). ``None``: the
        paper's weight-space model alone (bare vectors are their own function space).
        ``previous``: the fit of an earlier zoo; new and replaced models are fitted into it
        (``refit_`` says how many) unless the zoo drifted too far (then a full fit)."""
        return fitter.fit(self, zoo, probe, previous)

    def _build(self, spec: Architecture, ids: list[str], tau_loc: Tensor, tau_scale: Tensor,
               tau: Tensor | None, probe: Tensor | None, prior: SparseLocalizedGP | None = None) -> None:
        """The one construction path of fit and load: the learned state's containers, shaped
        for this zoo (the prior from the descriptors for a fit, from a saved state for a load)."""
        self.spec_, self.ids_ = spec, list(ids)
        self.tau_loc_, self.tau_scale_ = tau_loc, tau_scale
        self.probe_ = None if probe is None else probe.float()
        if prior is None:
            prior = SparseLocalizedGP.from_descriptors(self._normalize(tau), self.code_dim, self.num_inducing,
                                                       self.block_size, exact=self.exact_gp, seed=self.seed)
        self.module_ = ZooModel(spec, len(ids), self.code_dim, self.base_dim, self.hidden, prior)
        self.function_: FunctionSpaceGP | None = None
        self.annotations_: dict[str, Any] = {}

    def _normalize(self, tau: Tensor) -> Tensor:
        return (tau - self.tau_loc_) / self.tau_scale_

    def _signatures(self, weights: Tensor) -> Tensor | None:
        """Each model's function on the probe ``(n, N * out)``, its weights if it is a bare
        vector, ``None`` when there is no function space to work in."""
        if self.probe_ is None:
            return weights if self.spec_.is_vector else None
        with torch.no_grad():
            return torch.cat([self.spec_.forward(w, self.probe_).flatten(1) for w in weights.split(1024)])

    def _solved_readout(self, base: Tensor, mean: Tensor) -> tuple[Tensor, Tensor | None]:
        """``base`` with each readout solved so that the network computes ``mean`` ``(q, N * out)``
        on the probe, and the linear map ``(q, h + 1, N)`` from a function to its readout; a bare
        vector without probe is its own signature (``mean`` itself, no map)."""
        if self.spec_.is_vector and self.probe_ is None:
            return mean, None
        spec, q = self.spec_, base.shape[0]
        readout, a = solve_readout(spec, base, self.probe_, mean.reshape(q, -1, spec.num_outputs), self.readout_ridge_)
        return set_readout(spec, base, readout), a

    def _distilled(self, base: Tensor, mean: Tensor, probe: Tensor | None = None, steps: int | None = None,
                   on_step: Callable[[int, Tensor], None] | None = None) -> Tensor:
        """``base`` with every weight trained (Adam, squared error) to compute ``mean``
        ``(q, N * out)`` on the probe (or on ``probe``): the readout alone cannot carry what the
        decoded hidden layers lack, and hidden layers shaped to the task's own function also
        give the readout prior directions that shots can use."""
        probe = self.probe_ if probe is None else probe
        steps = self.distill_steps_ if steps is None else steps
        target = mean.reshape(base.shape[0], -1, self.spec_.num_outputs).float()
        with torch.enable_grad():  # personalize itself runs without autograd (not under inference_mode)
            return train_networks(self.spec_, base.float(), probe, target, steps=steps, lr=DISTILL_LR,
                                  on_step=on_step)

    def _readout_prior(self, base: Tensor, pred: FunctionPrediction) -> tuple[Tensor, ReadoutGaussian]:
        """Weights whose readout computes the predicted functions on the probe, and the Gaussian
        over readouts that the function-space predictive maps to."""
        spec, q = self.spec_, base.shape[0]
        factor, diag = pred.factor(), pred.scale[:, None] ** 2 * pred.residual  # (q, R, m), (q, m)
        weights, a = self._solved_readout(base, pred.mean)
        if a is None:  # the function space is the weight space
            return weights, ReadoutGaussian(weights, factor.transpose(1, 2), diag)
        n_out, rank = spec.num_outputs, factor.shape[1]
        a = a.float()  # single precision, as the prior is kept: the map is the request's largest product
        # every output's rows through the map in one batched matmul (q, h, c r), and the diagonal
        # (q, h, c): einsum's own overhead was half a served sine request's cost of each
        factor = a @ factor.reshape(q, rank, -1, n_out).permute(0, 2, 3, 1).reshape(q, -1, n_out * rank)
        diag = a**2 @ diag.reshape(q, -1, n_out)
        p = a.shape[1] * n_out
        return weights, ReadoutGaussian(weights[:, spec.readout_index.flatten()], factor.reshape(q, p, rank),
                                        diag.reshape(q, p))

    # -- use ----------------------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not hasattr(self, "module_"):
            raise NotFittedError("this MetaModel is not fitted yet: call fit(zoo) or load(path) first")

    @property
    def distillable(self) -> bool:
        """Whether ``personalize(distill=True)`` is defined: it needs the function-space head
        (it is the fast path where ``distill_steps_`` is 0 or ``None``, e.g. for bare vectors)."""
        self._check_fitted()
        return self.function_ is not None

    @property
    def tau_dim(self) -> int:
        self._check_fitted()
        return self.tau_loc_.numel()

    @torch.no_grad()
    def personalize(self, tau: Tensor | list[float], features: Tensor | None = None,
                    distill: bool = False) -> WeightPosterior:
        """Initializer for new task(s) from descriptors alone: ``(D,)`` or ``(q, D)``.
        ``features`` ``(q, d)``: networks whose hidden layers carry the readout instead of the
        decoded ones (e.g. a device's own pre-trained model). ``distill``: the slower path (an
        optimizer loop per task, FedDF-style): every weight, not only the readout, is trained
        for ``distill_steps_`` Adam steps to compute the predicted function on the probe, and the
        readout and its prior are then solved on the trained hidden layers."""
        self._check_fitted()
        t = check_descriptor(tau, self.tau_dim)
        prior, q = self.module_.prior, t.shape[0]
        code_mean, code_var = prior.predict(self._normalize(t))
        if features is None:
            decoded = self.module_.decode_mean(code_mean)
        else:  # a device's own hidden layers: nothing to decode
            self.spec_.check_flat(features)
            if not torch.isfinite(features).all():
                raise ArchitectureError("features has non-finite weights: the readout cannot be solved on them")
            decoded = features.float().reshape(q, -1)
        if distill and not self.distillable:
            raise FedfuseError("distill=True needs the function-space head; this fit has none (no probe)")
        if self.function_ is None:
            ratio = (code_var / (prior.kernel.outputscale + prior.noise).float()).mean(-1).clamp(0, 1)
            base = self.module_.base
            codes = DecodedCodes(self.module_.decoder, base.loc.detach(), base.scale.detach(), code_mean, code_var)
            return WeightPosterior(self.spec_, decoded, code_loc=code_mean, code_variance=code_var,
                                   uncertainty=ratio, novelty=ratio, decoded=codes, seed=self.seed)
        pred = self.function_.predict(t)
        if distill and self.distill_steps_:
            start, _ = self._solved_readout(decoded, pred.mean)
            decoded = self._distilled(start, pred.mean)
        weights, readout = self._readout_prior(decoded, pred)
        uncertainty = pred.expected_error
        if self.likelihood == "softmax":  # the expected share of probe inputs it misclassifies
            probs = torch.softmax(pred.mean.reshape(q, -1, self.spec_.num_outputs), -1)
            uncertainty = 1 - probs.max(-1).values.mean(1)
        return WeightPosterior(self.spec_, weights, code_loc=code_mean, code_variance=code_var,
                               uncertainty=uncertainty, novelty=pred.novelty, readout=readout,
                               distilled=bool(distill and self.distill_steps_), seed=self.seed)

    @torch.no_grad()
    def decode(self, tau: Tensor | list[float]) -> Tensor:
        """The paper's initializer ``m([E w_0; E w*])``: the decoder at the PIC predictive code,
        without the function-space readout (kept for comparison)."""
        self._check_fitted()
        t = check_descriptor(tau, self.tau_dim)
        return self.module_.decode_mean(self.module_.prior.predict(self._normalize(t))[0])

    @torch.no_grad()
    def reconstruct(self, own_readout: bool = False) -> Tensor:
        """Decoded weights of the training tasks at their codes' means, in canonical order; with
        ``own_readout`` each readout is solved for that model's own function on the probe (how
        well the decoded features carry the uploaded models)."""
        self._check_fitted()
        mean = self.module_.decode_mean(self.module_.codes.loc)
        if own_readout and self.function_ is not None:
            mean, _ = self._solved_readout(mean, (self.function_.y_ + self.function_.mu_).float())
        return mean

    # -- persistence --------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """One safetensors file: every tensor plus a JSON header (settings, spec, ids, history)."""
        self._check_fitted()
        tensors: dict[str, Tensor] = {"tau_loc": self.tau_loc_, "tau_scale": self.tau_scale_}
        tensors |= {f"module.{k}": v for k, v in self.module_.state_dict().items()}
        tensors |= {f"perms.{li}": p.to(torch.int32) for li, p in enumerate(self.perms_)}
        meta = {"format": FORMAT, "settings": self.get_params(), "spec": self.spec_.to_dict(),
                "ids": self.ids_, "history": self.history_, "readout_ridge": self.readout_ridge_,
                "distill_steps": self.distill_steps_, "annotations": self.annotations_}
        if self.probe_ is not None:
            tensors["probe"] = self.probe_
        if self.function_ is not None:
            fn_tensors, meta["function"] = self.function_.state()
            tensors |= {f"function.{k}": v for k, v in fn_tensors.items()}
        save_tensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | os.PathLike, pmap: ParallelMap | None = None) -> "MetaModel":
        tensors, meta = load_tensors(path)
        if meta.get("format") not in READABLE:
            raise FedfuseError(f"{path} holds {meta.get('format')!r}, not a meta-model ({FORMAT})")
        settings = meta["settings"]
        settings["hidden"] = tuple(settings["hidden"])
        self = cls(**settings, pmap=pmap)
        part = lambda prefix: {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}  # noqa: E731
        module = part("module")
        prior = SparseLocalizedGP.from_state({k[len("prior."):]: v for k, v in module.items() if k.startswith("prior.")},
                                             self.exact_gp)
        self._build(architectures.from_dict(meta["spec"]), meta["ids"], tensors["tau_loc"], tensors["tau_scale"],
                    None, tensors.get("probe"), prior)
        self.module_.load_state_dict(module)
        self.module_.condition()
        self.history_, self.n_rounds_ = meta["history"], len(meta["history"])
        self.annotations_ = meta.get("annotations", {})
        self.perms_ = [tensors[f"perms.{li}"].long() for li in range(len(self.spec_.perm_sizes))]
        self.readout_ridge_ = meta["readout_ridge"]
        self.readout_errors_: dict[float, float] = {}  # a diagnostic of the fit that chose it, not saved
        self.distill_steps_ = meta.get("distill_steps")  # None: a fit saved before distillation
        self.distill_errors_: dict[int, float] = {}  # a diagnostic of the fit that chose them, not saved
        if "function" in meta:
            self.function_ = FunctionSpaceGP.from_state(part("function"), meta["function"])
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
