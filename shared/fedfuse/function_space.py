"""The zoo in function space: a GP over task descriptors whose draws are whole functions.

Each uploaded model ``i`` is summarized by its *signature* ``s_i`` in ``R^m``: its outputs on
the server's probe inputs (the function it computes there), or, for a bare vector, the vector
itself. Signatures are permutation invariant, so no alignment enters here. The zoo is modelled
as matrix normal: ``cov(s_i, s_j) = (k(tau_i, tau_j) + noise delta_ij) C``, so every output
shares the descriptor kernel ``k`` and the predictive mean of a new task,
``mu + k_*^T (K + noise N)^-1 (S - mu)``, does not depend on ``C`` (``N``: each model's relative
noise, larger for a model trained on fewer examples).

Settings are chosen on the zoo alone, by leave-one-out: predicting model ``i`` from all the
others is exactly what personalization does for a new device. For a GP the LOO residuals have a
closed form (Rasmussen & Williams, Sec. 5.4.2), ``r_i = [G (S - mu)]_i / G_ii`` with
``G = (K + noise I)^-1``, differentiable in the hyperparameters: the kernel family, its
lengthscales and the noise minimize the mean squared LOO residual. Large zoos use the same
objective on local neighbourhoods (each prediction from its ``neighbours`` nearest tasks).

The output covariance ``C`` comes from the standardized LOO residuals and is scaled so that the
central ``coverage`` band of the zoo's own LOO predictions holds that fraction of their values:
the predictive band is calibrated on the zoo, not assumed. The LOO errors also give each new task
an ``expected_error`` (a kernel-weighted average of its neighbours' relative LOO errors).

Zoo models err alike where their descriptors are alike, so a new task's covariance can come
from *nearby* models: the standardized LOO residuals of its ``size`` nearest zoo models, shrunk
by ``lam`` towards the shared ``C``. ``(size, lam)``, or the shared ``C`` alone, is whichever
gives the zoo models' own residuals the highest held-out Gaussian likelihood under the
covariance their neighbours give (a seeded subset of at most 256 models and 128 signature
entries is scored; the shared option is scored as the full empirical covariance, which the
served rank-``rank``-plus-diagonal ``C`` equals on probes of up to ``rank`` entries).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import gpytorch
import torch
from torch import Tensor, nn

from fedfuse.kernels import KERNELS, is_set_valued, make_kernel, scale_lengthscales
from fedfuse.zoo import robust_scale

# (neighbours, shrinkage towards the shared covariance) a nearby-model covariance may take;
# sizes the zoo cannot fill are skipped
NEARBY_GRID = ((16, 0.5), (32, 0.3), (32, 0.5), (64, 0.1), (64, 0.2), (64, 0.3), (64, 0.5), (128, 0.2), (128, 0.3))
LIKELIHOOD_COORDS = 128  # signature entries the held-out likelihood reads (a seeded subset)
LIKELIHOOD_MODELS = 256  # zoo models it scores (a seeded subset; their neighbours come from all)

@dataclass
class FunctionPrediction:
    """Predictive distribution of new tasks' signatures (``q`` tasks, ``m`` values each).

    ``cov_q = scale_q^2 (nearby_q^T nearby_q + basis^T basis + diag(residual))``: a calibrated
    low-rank-plus-diagonal covariance, its ``nearby`` rows from the task's nearest zoo models (none
    where the zoo chose the shared covariance), scaled by each task's own GP variance.
    """

    mean: Tensor  # (q, m)
    scale: Tensor  # (q,)
    basis: Tensor  # (r, m)
    residual: Tensor  # (m,)
    novelty: Tensor  # (q,) predictive over prior variance: 0 among the zoo, 1 far from it
    expected_error: Tensor  # (q,) predicted relative error of ``mean``
    nearby: Tensor | None = None  # (q, s, m)

    @property
    def variance(self) -> Tensor:
        var = (self.basis**2).sum(0) + self.residual
        if self.nearby is not None:
            var = var + (self.nearby**2).sum(1)
        return self.scale[:, None] ** 2 * var

    def factor(self) -> Tensor:
        """``(q, k, m)``: ``mean + factor^T xi`` with ``xi ~ N(0, I_k)`` samples the low-rank part;
        ``k = s + r``, or ``m`` rows with the same product where ``s + r`` would exceed ``m`` (a
        small probe: the readout prior and the wire stay as small as the function space)."""
        rows = self.basis.expand(self.scale.shape[0], -1, -1)
        if self.nearby is not None:
            rows = torch.cat([self.nearby, rows], 1)
            if rows.shape[1] > rows.shape[2]:
                wide = rows.double()
                w, v = torch.linalg.eigh(wide.transpose(1, 2) @ wide)
                rows = (v * w.clamp_min(0).sqrt()[:, None, :]).transpose(1, 2).to(rows.dtype)
        return self.scale[:, None, None] * rows


@dataclass
class _Loo:
    residual: Tensor  # (a, m) signature minus its LOO prediction
    variance: Tensor  # (a,) LOO predictive variance in kernel units
    index: Tensor  # (a,) which zoo models these are


class FunctionSpaceGP(nn.Module):
    """Fit on descriptors ``(n, D)`` and signatures ``(n, m)``; predict new tasks' signatures.

    ``kernel``: one of :data:`fedfuse.kernels.KERNELS` or ``"auto"`` (every family that fits the
    descriptors, the best LOO wins). The hyperparameters of zoos above ``exact_fit`` models are
    fitted on the LOO of ``anchors`` random models, each predicted from its ``neighbours``
    nearest tasks; zoos above ``max_exact`` models also predict from local neighbourhoods.
    """

    def __init__(self, kernel: str = "auto", exact_fit: int = 1024, max_exact: int = 2048,
                 neighbours: int = 64, anchors: int = 256, steps: int = 100, lr: float = 0.05, rank: int = 64,
                 coverage: float = 0.9, seed: int = 0) -> None:
        super().__init__()
        if kernel != "auto" and kernel not in KERNELS:
            raise ValueError(f"kernel={kernel!r}: use 'auto' or one of {KERNELS}")
        self.kernel_choice, self.exact_fit, self.max_exact = kernel, exact_fit, max_exact
        self.neighbours = neighbours
        self.anchors, self.steps, self.lr, self.rank = anchors, steps, lr, rank
        self.coverage, self.seed = coverage, seed

    # -- inputs ---------------------------------------------------------------------------------
    def _inputs(self, tau: Tensor) -> Tensor:
        """The kernel's view of descriptors: raw sets for ``overlap``, robustly standardized
        otherwise."""
        t = tau.double()
        return t if self.kernel_name_ == "overlap" else (t - self.loc_) / self.tau_scale_

    @property
    def local(self) -> bool:
        return self.x_.shape[0] > self.max_exact

    # -- leave-one-out ----------------------------------------------------------------------------
    def _loo(self, kernel: gpytorch.kernels.Kernel, log_noise: Tensor, x: Tensor, y: Tensor,
             anchors: Tensor | None) -> _Loo:
        noise = log_noise.exp() * self.noise_scale_
        n = x.shape[0]
        if anchors is None:  # closed form over the whole zoo
            k = _k(kernel, x, x) + torch.diag(noise + 1e-8)
            g = torch.cholesky_inverse(torch.linalg.cholesky(k))
            diag = torch.diagonal(g)
            return _Loo((g @ y) / diag[:, None], 1.0 / diag, torch.arange(n))
        nbrs = self._nearest(x[anchors], x, exclude=anchors)  # (a, M)
        xa, xn, yn = x[anchors], x[nbrs], y[nbrs]
        knn = _k(kernel, xn, xn) + torch.diag_embed(noise[nbrs] + 1e-8)
        kan = _k(kernel, xa[:, None, :], xn)[:, 0, :]  # (a, M)
        kaa = _kdiag(kernel, xa)
        chol = torch.linalg.cholesky(knn)
        w = torch.cholesky_solve(kan[..., None], chol)[..., 0]  # (a, M)
        pred = torch.einsum("am,amd->ad", w, yn)
        var = kaa + noise[anchors] - (w * kan).sum(-1)
        return _Loo(y[anchors] - pred, var.clamp_min(1e-12), anchors)

    def _nearest(self, query: Tensor, x: Tensor, exclude: Tensor | None = None,
                 count: int | None = None) -> Tensor:
        """Indices ``(q, M)`` of the ``count`` (default ``neighbours``) zoo tasks nearest each
        query in the kernel's input space, leaving out each query's own index when given (and
        not negative)."""
        dist = torch.cdist(query.detach(), x.detach())
        if exclude is not None:  # a negative index: nothing of that query's own to leave out
            keep = exclude >= 0
            dist[torch.arange(len(exclude))[keep], exclude[keep]] = math.inf
        m = min(count or self.neighbours, x.shape[0] - (exclude is not None))
        return dist.topk(m, largest=False).indices

    def _metric(self, x: Tensor) -> Tensor:
        """Coordinates in which Euclidean distance follows the fitted kernel: inputs over the
        RBF lengthscales (ARD: irrelevant entries vanish), unit vectors for ``overlap``."""
        for module in self.kernel_.modules():
            if getattr(module, "has_lengthscale", False):
                ls = module.lengthscale.detach().reshape(-1)
                if self.kernel_name_ == "overlap":
                    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12) / ls
                return x / ls
        return x

    @staticmethod
    def _objective(loo: _Loo) -> Tensor:
        return (loo.residual**2).mean()

    # -- fit --------------------------------------------------------------------------------------
    def fit(self, tau: Tensor, signatures: Tensor, weights: Tensor | None = None,
            previous: "FunctionSpaceGP | None" = None) -> "FunctionSpaceGP":
        """``weights`` ``(n,)``: how much each model is trusted, e.g. its number of training
        examples; a model's noise variance scales with the zoo's mean weight over its own.
        ``previous``: a fit on an earlier zoo whose kernel, noise and descriptor scaling are
        kept (an incremental refit: only the calibration and the conditioning are redone)."""
        tau, y = tau.double(), signatures.double()
        n = tau.shape[0]
        w = torch.ones(n, dtype=torch.float64) if weights is None else weights.double()
        self.noise_scale_ = (w.mean() / w) if bool((w > 0).all()) else torch.ones(n, dtype=torch.float64)
        self.mu_ = y.mean(0)
        y = y - self.mu_
        gen = torch.Generator().manual_seed(self.seed)
        anchors = (torch.randperm(n, generator=gen)[: self.anchors].sort().values
                   if n > self.exact_fit else None)
        if previous is not None:
            self.loc_, self.tau_scale_ = previous.loc_, previous.tau_scale_
            self.kernel_name_, self.kernel_, self.log_noise_ = previous.kernel_name_, previous.kernel_, previous.log_noise_
            self.candidates_ = dict(previous.candidates_)
        else:
            self.loc_, self.tau_scale_ = robust_scale(tau)
            names = [self.kernel_choice] if self.kernel_choice != "auto" else [
                k for k in KERNELS if k != "overlap" or is_set_valued(tau)]
            self.candidates_: dict[str, float] = {}
            best = None
            for name in names:
                self.kernel_name_ = name
                kernel, log_noise, value = self._fit_kernel(name, self._inputs(tau), y, anchors)
                self.candidates_[name] = value
                if best is None or value < best[0]:
                    best = (value, name, kernel, log_noise)
            _, self.kernel_name_, self.kernel_, log_noise = best
            self.log_noise_ = log_noise.detach()
        self.x_, self.y_ = self._inputs(tau), y
        self._calibrate(anchors)
        self._condition()
        return self

    def _fit_kernel(self, name: str, x: Tensor, y: Tensor, anchors: Tensor | None
                    ) -> tuple[gpytorch.kernels.Kernel, Tensor, float]:
        """A coarse start (lengthscale multiplier and noise on a grid), then Adam on the LOO."""
        if x.shape[0] < 3:  # nothing to leave out: defaults
            return make_kernel(name, x.shape[1]), torch.tensor(math.log(1e-2), dtype=torch.float64), math.inf
        start = None
        for factor in (0.25, 1.0, 4.0):
            for noise in (1e-3, 1e-1):
                kernel = make_kernel(name, x.shape[1])
                scale_lengthscales(kernel, factor)
                log_noise = torch.tensor(math.log(noise), dtype=torch.float64)
                with torch.no_grad():
                    value = float(self._objective(self._loo(kernel, log_noise, x, y, anchors)))
                if math.isfinite(value) and (start is None or value < start[0]):
                    start = (value, kernel, log_noise)
        _, kernel, log_noise = start
        log_noise = nn.Parameter(log_noise.clone())
        opt = torch.optim.Adam([*kernel.parameters(), log_noise], lr=self.lr)
        for _ in range(self.steps):
            opt.zero_grad()
            loss = self._objective(self._loo(kernel, log_noise, x, y, anchors))
            loss.backward()
            opt.step()
            with torch.no_grad():
                log_noise.clamp_(math.log(1e-6), math.log(1e2))
        with torch.no_grad():
            value = float(self._objective(self._loo(kernel, log_noise, x, y, anchors)))
        kernel.requires_grad_(False)
        return kernel, log_noise.detach(), value

    @torch.no_grad()
    def _calibrate(self, anchors: Tensor | None) -> None:
        """Output covariance, band scale and per-model relative errors from the LOO residuals."""
        loo = self._loo(self.kernel_, self.log_noise_, self.x_, self.y_, anchors)
        std = loo.residual / loo.variance.sqrt()[:, None]  # (a, m) standardized residuals
        a = std.shape[0]
        _, s, vt = torch.linalg.svd(std / math.sqrt(a), full_matrices=False)
        r = min(self.rank, s.numel())
        basis = s[:r, None] * vt[:r]
        residual = ((std**2).mean(0) - (basis**2).sum(0)).clamp_min(0)
        marginal = ((basis**2).sum(0) + residual).clamp_min(1e-30)
        z = (std.abs() / marginal.sqrt()).flatten()
        kappa = float(torch.quantile(z, self.coverage) / _quantile(self.coverage)) if z.numel() else 1.0
        self.basis_, self.residual_ = kappa * basis, kappa**2 * residual
        self.nearby_residuals_ = (kappa * std).float()  # gathered per request: single precision
        self.loo_var_ = loo.variance
        # relative LOO error of each model: its error over its own spread across the outputs
        spread = (self.y_[loo.index] + self.mu_ - (self.y_[loo.index] + self.mu_).mean(1, keepdim=True))
        self.loo_error_ = loo.residual.norm(dim=1) / spread.norm(dim=1).clamp_min(1e-12)
        self.loo_index_ = loo.index
        self.error_neighbours_ = self._choose_error_neighbours()
        self.nearby_size_, self.nearby_shrink_ = self._choose_nearby_covariance()

    def _choose_error_neighbours(self) -> int:
        """How many nearest zoo models' LOO errors predict a new task's error: the count whose
        own leave-one-out prediction of the zoo's (log) errors is best."""
        pts, log_err = self._metric(self.x_[self.loo_index_]), self.loo_error_.clamp_min(1e-12).log()
        n = len(log_err)
        if n < 3:
            return 1
        order = self._nearest(pts, pts, exclude=torch.arange(n), count=n - 1)
        scores = {k: float(((log_err[order[:, :k]].mean(1) - log_err) ** 2).mean())
                  for k in (1, 2, 4, 8, 16, 32, 64) if k < n}
        return min(scores, key=scores.get)

    def _choose_nearby_covariance(self) -> tuple[int, float]:
        """``(size, lam)`` of the nearby-model covariance, ``(0, 1.0)`` for the shared one: whichever
        gives the zoo models' own residuals the highest held-out likelihood, each under the
        covariance of its nearest other models (and the shared one without it)."""
        z = self.nearby_residuals_.double()
        a, m = z.shape
        grid = [(size, lam) for size, lam in NEARBY_GRID if size < a - 1]
        if not grid:
            return 0, 1.0
        gen = torch.Generator().manual_seed(self.seed)
        if m > LIKELIHOOD_COORDS:  # a marginal of the same Gaussians: a seeded subset of entries
            z = z[:, torch.randperm(m, generator=gen)[:LIKELIHOOD_COORDS]]
        rows = torch.randperm(a, generator=gen)[:LIKELIHOOD_MODELS].sort().values
        zr = z[rows]
        shared = ((z.T @ z)[None] - zr[:, :, None] * zr[:, None, :]) / (a - 1)  # each model left out
        pts = self._metric(self.x_[self.loo_index_])
        order = self._nearest(pts[rows], pts, exclude=rows, count=max(size for size, _ in grid))
        scores = {(0, 1.0): held_out_loglik(zr, shared)}
        for size, lam in grid:
            near = z[order[:, :size]]
            scores[(size, lam)] = held_out_loglik(zr, (1 - lam) * near.transpose(1, 2) @ near / size + lam * shared)
        return max(scores, key=scores.get)

    def _nearby_rows(self, order: Tensor) -> Tensor | None:
        """The nearby-model covariance's rows ``(q, size, m)`` for tasks whose nearest LOO models,
        nearest first, are ``order`` ``(q, >= size)``; ``None`` for the shared covariance."""
        if not self.nearby_size_:
            return None
        return self.nearby_residuals_[order[:, : self.nearby_size_]] * math.sqrt(
            (1 - self.nearby_shrink_) / self.nearby_size_)

    def _prediction(self, mean: Tensor, var: Tensor, kss: Tensor, expected: Tensor,
                    nearby: Tensor | None) -> FunctionPrediction:
        return FunctionPrediction(mean.float(), var.sqrt().float(), self._shared_basis, self._shared_residual,
                                  (var / kss).clamp(0, 1).float(), expected.float(),
                                  None if nearby is None else nearby.float())

    @torch.no_grad()
    def _condition(self) -> None:
        """What predictions need; called by fit and by load (one path). It caches what the
        calibration and the nearby covariance fix (``basis_``, ``residual_``, ``loo_error_``,
        ``loo_var_``, ``nearby_shrink_``): whoever changes those calls it again."""
        self.loo_points_ = self._metric(self.x_[self.loo_index_])  # where each request's neighbours are sought
        # the rest is fixed by the fit: computed once here, not again on every request
        self._log_loo_error = self.loo_error_.clamp_min(1e-12).log()
        self._typical_loo_var = self.loo_var_.median()
        self._shared_basis = (math.sqrt(self.nearby_shrink_) * self.basis_).float()
        self._shared_residual = (self.nearby_shrink_ * self.residual_).float()
        if not self.local:
            k = _k(self.kernel_, self.x_, self.x_) + torch.diag(self.log_noise_.exp() * self.noise_scale_ + 1e-8)
            self.chol_ = torch.linalg.cholesky(k)
            self.alpha_ = torch.cholesky_solve(self.y_, self.chol_)

    # -- predict ----------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, tau_star: Tensor) -> FunctionPrediction:
        x = self._inputs(tau_star)
        noise = self.log_noise_.exp()
        # each task's prior variance comes from the same kernel call as its covariances with the
        # zoo (one call, not two: on a served request each costs as much as the solve)
        if self.local:
            nbrs = self._nearest(x, self.x_)
            xn = self.x_[nbrs]
            knn = _k(self.kernel_, xn, xn) + torch.diag_embed(noise * self.noise_scale_[nbrs] + 1e-8)
            k_both = _k(self.kernel_, x[:, None, :], torch.cat([x[:, None, :], xn], 1))[:, 0, :]  # (q, 1 + M)
            kss, ksn = k_both[:, 0] + noise, k_both[:, 1:]
            w = torch.cholesky_solve(ksn[..., None], torch.linalg.cholesky(knn))[..., 0]
            mean = torch.einsum("qm,qmd->qd", w, self.y_[nbrs])
            explained = (w * ksn).sum(-1)
        else:
            q = x.shape[0]
            k_both = _k(self.kernel_, x, torch.cat([x, self.x_]))  # (q, q + n)
            kss, k_zoo = torch.diagonal(k_both[:, :q]) + noise, k_both[:, q:]
            mean = k_zoo @ self.alpha_
            v = torch.cholesky_solve(k_zoo.T, self.chol_)
            explained = (k_zoo.T * v).sum(0)
        var = (kss - explained).clamp_min(1e-12)
        # expected relative error: the nearest zoo models' LOO errors (geometric mean), grown by
        # how much less the GP knows here than at a typical zoo model
        order = self._nearest(self._metric(x), self.loo_points_, count=max(self.error_neighbours_, self.nearby_size_))
        smoothed = self._log_loo_error[order[:, : self.error_neighbours_]].mean(1).exp()
        expected = smoothed * (var / self._typical_loo_var).clamp_min(1).sqrt()
        return self._prediction(mean + self.mu_, var, kss, expected, self._nearby_rows(order))

    @torch.no_grad()
    def loo_predictions(self, index: Tensor, nearby: bool = True) -> FunctionPrediction:
        """Leave-one-out predictives of zoo models ``index``: what the GP would have told each
        of them as a new device (a nearby-model covariance from its nearest *other* models; the
        expected error is the model's own LOO error where it has one). ``nearby=False`` leaves
        the nearby rows out: for callers that read the mean only (they cost ``q s m`` floats)."""
        if self.local:
            loo = self._loo(self.kernel_, self.log_noise_, self.x_, self.y_, index)
        else:
            full = self._loo(self.kernel_, self.log_noise_, self.x_, self.y_, None)
            loo = _Loo(full.residual[index], full.variance[index], index)
        x = self.x_[index]
        kss = _kdiag(self.kernel_, x) + self.log_noise_.exp()
        position = torch.full((self.x_.shape[0],), -1, dtype=torch.long)
        position[self.loo_index_] = torch.arange(len(self.loo_index_))
        own = position[index]
        expected = torch.where(own >= 0, self.loo_error_[own.clamp_min(0)], self.loo_error_.median())
        rows = None
        if nearby and self.nearby_size_:
            rows = self._nearby_rows(self._nearest(self._metric(x), self.loo_points_, exclude=own,
                                                   count=self.nearby_size_))
        return self._prediction(self.y_[index] - loo.residual + self.mu_, loo.variance, kss, expected, rows)

    def loo_residuals(self) -> Tensor:
        """The zoo's own leave-one-out residuals at the fitted settings ``(n, m)`` (exact zoos)."""
        with torch.no_grad():
            return self._loo(self.kernel_, self.log_noise_, self.x_, self.y_, None).residual

    # -- persistence --------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, Tensor], dict]:
        """Tensors and JSON-able settings that :meth:`from_state` rebuilds this from."""
        tensors = {"x": self.x_, "y": self.y_, "mu": self.mu_, "loc": self.loc_, "tau_scale": self.tau_scale_,
                   "noise_scale": self.noise_scale_,
                   "log_noise": self.log_noise_, "basis": self.basis_, "residual": self.residual_,
                   "loo_var": self.loo_var_, "loo_error": self.loo_error_, "loo_index": self.loo_index_,
                   "nearby_residuals": self.nearby_residuals_}
        tensors |= {f"kernel.{k}": v for k, v in self.kernel_.state_dict().items()}
        meta = {"kernel": self.kernel_name_, "candidates": self.candidates_,
                "error_neighbours": self.error_neighbours_, "nearby": [self.nearby_size_, self.nearby_shrink_],
                "settings": {"kernel": self.kernel_choice, "exact_fit": self.exact_fit, "max_exact": self.max_exact,
                             "neighbours": self.neighbours, "anchors": self.anchors, "steps": self.steps,
                             "lr": self.lr, "rank": self.rank, "coverage": self.coverage, "seed": self.seed}}
        return tensors, meta

    @classmethod
    def from_state(cls, tensors: dict[str, Tensor], meta: dict) -> "FunctionSpaceGP":
        self = cls(**meta["settings"])
        self.kernel_name_, self.candidates_ = meta["kernel"], meta["candidates"]
        self.x_, self.y_, self.mu_ = tensors["x"], tensors["y"], tensors["mu"]
        self.loc_, self.tau_scale_, self.log_noise_ = tensors["loc"], tensors["tau_scale"], tensors["log_noise"]
        self.noise_scale_ = tensors["noise_scale"]
        self.basis_, self.residual_ = tensors["basis"], tensors["residual"]
        self.loo_var_, self.loo_error_ = tensors["loo_var"], tensors["loo_error"]
        self.loo_index_ = tensors["loo_index"].long()
        self.error_neighbours_ = int(meta["error_neighbours"])
        # fits saved before nearby covariances existed keep the shared one
        self.nearby_residuals_ = (tensors["nearby_residuals"] if "nearby_residuals" in tensors
                                  else torch.zeros(0, self.y_.shape[1]))
        size, shrink = meta.get("nearby", (0, 1.0))
        self.nearby_size_, self.nearby_shrink_ = int(size), float(shrink)
        self.kernel_ = make_kernel(self.kernel_name_, self.x_.shape[1])
        self.kernel_.load_state_dict({k[len("kernel."):]: v for k, v in tensors.items() if k.startswith("kernel.")})
        self.kernel_.requires_grad_(False)
        self._condition()
        return self


def _k(kernel: gpytorch.kernels.Kernel, a: Tensor, b: Tensor) -> Tensor:
    """A dense kernel matrix; sums are summed densely (gpytorch would add a low-rank linear
    part through an iterative root decomposition). Evaluated at once, not lazily: the matrix is
    wanted dense anyway, and the lazy wrapper doubled a served request's kernel time."""
    if isinstance(kernel, gpytorch.kernels.AdditiveKernel):
        return sum(_k(part, a, b) for part in kernel.kernels)
    # a process-wide flag: a thread evaluating at the same time (a replica's poller loading a
    # new fit) can at worst get the other evaluation, which gives the same dense matrix
    with gpytorch.settings.lazily_evaluate_kernels(False):
        return kernel(a, b).to_dense()


def _kdiag(kernel: gpytorch.kernels.Kernel, a: Tensor) -> Tensor:
    if isinstance(kernel, gpytorch.kernels.AdditiveKernel):
        return sum(_kdiag(part, a) for part in kernel.kernels)
    return kernel(a, a, diag=True)


def held_out_loglik(z: Tensor, cov: Tensor) -> float:
    """Mean Gaussian log-density of each row of ``z`` ``(a, m)`` under its own covariance
    ``(a, m, m)``, each loaded by 1e-3 of its mean variance so that one built from fewer than
    ``m`` residuals is still a proper density."""
    load = 1e-3 * torch.diagonal(cov, dim1=1, dim2=2).mean(1).clamp_min(1e-30)[:, None, None]
    chol = torch.linalg.cholesky(cov + load * torch.eye(cov.shape[-1], dtype=cov.dtype))
    sol = torch.cholesky_solve(z[..., None], chol)[..., 0]
    return float((-0.5 * (z * sol).sum(1) - torch.diagonal(chol, dim1=1, dim2=2).log().sum(1)).mean())


def _quantile(coverage: float) -> float:
    """``Phi^-1((1 + coverage) / 2)``: half-width of a central Gaussian band, in stds."""
    return float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor((1 + coverage) / 2)))
