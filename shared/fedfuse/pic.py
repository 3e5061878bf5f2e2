"""Sparse localized GP prior (PIC) over task descriptors, one GP per code dimension.

For code dimension ``kappa`` the codes of the ``n`` training tasks have the prior
``N(0, Q + blockdiag(K_oo - Q_oo) + s^2 I)`` with ``Q = K_n+ K_++^-1 K_+n`` (Eq. 2, 10): tasks in
the same k-means block keep their exact covariance, tasks in different blocks are coupled only
through ``m`` learned representative tasks ``tau+``. ``s^2`` is a small learned nugget that keeps
the covariance positive definite. Blocks are padded to one size (identity on the padding), so
the whole prior is one batched Cholesky: ``O(n m^2 + sum_o n_o^3)`` by Woodbury.

The math runs in float64; kernels are gpytorch's (ARD RBF with a learned output scale).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import gpytorch
import numpy as np
import torch
from scipy.cluster.vq import kmeans2
from scipy.spatial.distance import cdist
from torch import Tensor, nn

LOG_2PI = math.log(2 * math.pi)


def kmeans_pp(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """scipy's k-means++ seeding (the same draws, so the same centres as ``minit="++"``) with
    each point's distance to its nearest centre kept up to date: ``O(n k)`` where scipy's
    recomputes every earlier centre's (``O(n k^2)``: 6 s at 20,000 models, over 9 minutes at
    100,000, with ``k = n / 40`` blocks; this takes 0.05 s and 1.5 s)."""
    rng = np.random.RandomState(seed)
    init = np.empty((k, x.shape[1]))
    init[0] = x[rng.randint(0, x.shape[0])]
    d2 = cdist(init[:1], x, "sqeuclidean")[0]
    for i in range(1, k):
        cum = (d2 / d2.sum()).cumsum()
        init[i] = x[int(np.searchsorted(cum, rng.uniform()))]
        np.minimum(d2, cdist(init[i : i + 1], x, "sqeuclidean")[0], out=d2)
    return init


def kmeans(x: Tensor, k: int, seed: int) -> tuple[Tensor, Tensor]:
    """k-means (scipy, k-means++ init); returns non-empty ``centres`` and each row's label."""
    k = max(1, min(k, x.shape[0]))
    if k == 1:
        return x.mean(0, keepdim=True), torch.zeros(x.shape[0], dtype=torch.long)
    data = x.double().numpy()
    centres, labels = kmeans2(data, kmeans_pp(data, k, seed), minit="matrix")
    used = np.unique(labels)
    remap = np.full(k, -1)
    remap[used] = np.arange(used.size)
    return torch.from_numpy(centres[used]).to(x.dtype), torch.from_numpy(remap[labels]).long()


def cap_blocks(x: Tensor, labels: Tensor, cap: int) -> Tensor:
    """Split every block larger than ``cap`` into near-equal pieces along its principal
    direction: padding to the largest block then costs at most ``cap^3`` per block."""
    out = labels.clone()
    next_label = int(labels.max()) + 1
    for o in range(int(labels.max()) + 1):
        members = torch.nonzero(labels == o).flatten()
        if len(members) <= cap:
            continue
        pts = x[members] - x[members].mean(0)
        direction = torch.linalg.svd(pts, full_matrices=False)[2][0] if pts.shape[1] > 1 else torch.ones(1, dtype=x.dtype)
        order = members[torch.argsort(pts @ direction)]
        pieces = torch.tensor_split(order, -(-len(members) // cap))
        for piece in pieces[1:]:
            out[piece] = next_label
            next_label += 1
    return out


@dataclass
class _Blocks:
    index: Tensor  # (p, B) task index per block slot, 0 on padding
    mask: Tensor  # (p, B) True where a slot holds a task


@dataclass
class _Factor:
    """Everything the density and the predictive share, per code dimension ``e``, over the
    blocks ``index``/``mask`` (all of them, or a random subset whose sums are rescaled by
    ``scale`` = blocks in all over blocks here to estimate the whole prior's)."""

    lpp: Tensor  # (e, m, m) Cholesky of K++
    vb: Tensor  # (e, p, B, m) Lpp^-1 K+n per block slot (U)
    ld: Tensor  # (e, p, B, B) Cholesky of the block-diagonal correction D
    a: Tensor  # (e, p, B, m) D^-1 U
    lc: Tensor  # (e, m, m) Cholesky of C = I + scale U^T D^-1 U
    index: Tensor  # (p, B) task index per block slot, 0 on padding
    mask: Tensor  # (p, B) True where a slot holds a task
    scale: float


@dataclass
class _Precision:
    """The pieces of ``Sigma^-1 = D^-1 - A C^-1 A^T`` and ``log|Sigma|``."""

    dinv: Tensor
    cinv: Tensor
    ac: Tensor  # Sigma^-1 U, per block
    a: Tensor
    vb: Tensor
    logdet: Tensor  # (e,)
    diag: Tensor  # diagonal of Sigma^-1, padded
    index: Tensor
    mask: Tensor
    scale: float


@dataclass
class _Predictive:
    """What a prediction needs once the training codes are known (see ``condition``)."""

    lpp: Tensor
    alpha: Tensor  # Sigma^-1 mu, padded
    v_alpha: Tensor  # V Sigma^-1 mu
    m_mat: Tensor  # V Sigma^-1 V^T
    p_blocks: Tensor  # (V Sigma^-1)^T per block
    s_rr: Tensor  # Sigma^-1 diagonal blocks
    vb: Tensor
    prior_var: Tensor  # (e,) the kernel's outputscale
    noise: Tensor  # (e,)


@dataclass
class FrozenPrior:
    """The prior factored once at fixed hyperparameters: its expected log-density is cheap and
    differentiates only through the codes (the steps between two hyperparameter updates)."""

    gp: "SparseLocalizedGP"
    precision: _Precision

    def expected_log_prob(self, mean: Tensor, var: Tensor | None = None) -> Tensor:
        """The density's value, and its gradients in the codes given in closed form
        (``-Sigma^-1 mean`` and ``-diag(Sigma^-1) / 2``): autograd through the frozen ``O(n B^2)``
        precision copied it on every step (1.3 s a step at 100,000 models)."""
        gp, c = self.gp, self.precision
        with torch.no_grad():
            mu = gp._pad(mean, c.index, c.mask)
            g = gp._solve(c, mu)
            value = gp._value(c, mu, g, var)
        out = value - (gp._unpad(g, c).to(mean.dtype) * (mean - mean.detach())).sum()
        if var is not None:
            out = out - 0.5 * (gp._unpad(c.diag, c).to(var.dtype) * (var - var.detach())).sum()
        return out


def _pad_blocks(labels: Tensor, p: int) -> _Blocks:
    members = [torch.nonzero(labels == o).flatten() for o in range(p)]
    width = max(len(m) for m in members)
    index = torch.zeros(p, width, dtype=torch.long)
    mask = torch.zeros(p, width, dtype=torch.bool)
    for o, m in enumerate(members):
        index[o, : len(m)] = m
        mask[o, : len(m)] = True
    return _Blocks(index, mask)


class SparseLocalizedGP(nn.Module):
    """PIC prior and predictive for ``e`` code dimensions over descriptors ``tau`` ``(n, D)``.

    Built from its structure (the training descriptors, the k-means ``centres`` and block
    ``labels``, the initial representative tasks ``inducing`` ``(e, m, D)``); fit and load share
    this one constructor, :meth:`from_descriptors` computes the structure for a fit.
    ``exact=True``: the full GP (one block, every task its own representative, nothing learned in
    ``tau+``), the reference the PIC form must reproduce with ``p = 1``.
    """

    def __init__(self, tau: Tensor, centres: Tensor, labels: Tensor, inducing: Tensor, exact: bool = False,
                 min_noise: float = 1e-4) -> None:
        super().__init__()
        num_outputs = inducing.shape[0]
        self.num_outputs, self.exact, self.min_noise = num_outputs, exact, min_noise
        batch = torch.Size([num_outputs])
        self.kernel = gpytorch.kernels.ScaleKernel(
            gpytorch.kernels.RBFKernel(ard_num_dims=tau.shape[1], batch_shape=batch),
            batch_shape=batch,
        ).double()
        with torch.no_grad():
            self.kernel.base_kernel.lengthscale = torch.ones(num_outputs, 1, tau.shape[1])
            self.kernel.outputscale = torch.ones(num_outputs)
        self.raw_noise = nn.Parameter(torch.full((num_outputs,), -4.0, dtype=torch.float64))
        self.register_buffer("tau", tau.double())
        self.register_buffer("centres", centres.double())
        self.register_buffer("labels", labels.long())
        blocks = _pad_blocks(labels, centres.shape[0])
        self.register_buffer("block_index", blocks.index)
        self.register_buffer("block_mask", blocks.mask)
        inducing = inducing.double().clone()
        if exact:
            self.register_buffer("inducing", inducing)
        else:
            self.inducing = nn.Parameter(inducing)
        self._predictive: _Predictive | None = None

    @classmethod
    def from_descriptors(cls, tau: Tensor, num_outputs: int, num_inducing: int = 32, block_size: int = 40,
                         num_blocks: int | None = None, exact: bool = False, seed: int = 0) -> "SparseLocalizedGP":
        """A prior for these training descriptors: k-means blocks (capped in size) and
        representative tasks from k-means; or the exact GP's single block."""
        tau = tau.double()
        n = tau.shape[0]
        if exact:
            inducing = tau.clone()
            centres, labels = tau.mean(0, keepdim=True), torch.zeros(n, dtype=torch.long)
        else:
            centres, labels = kmeans(tau, num_blocks or max(1, round(n / block_size)), seed)
            if num_blocks is None:
                labels = cap_blocks(tau, labels, max(2, int(1.25 * block_size)))
                centres = torch.stack([tau[labels == o].mean(0) for o in range(int(labels.max()) + 1)])
            inducing = kmeans(tau, num_inducing, seed + 1)[0] if num_inducing < n else tau
        return cls(tau, centres, labels, inducing.expand(num_outputs, -1, -1), exact)

    @classmethod
    def from_state(cls, state: dict[str, Tensor], exact: bool) -> "SparseLocalizedGP":
        """Rebuild a saved prior exactly (no k-means rerun) from its ``state_dict``."""
        self = cls(state["tau"], state["centres"], state["labels"], state["inducing"], exact)
        self.load_state_dict(state)
        return self

    # -- pieces ---------------------------------------------------------------------------------------
    @property
    def noise(self) -> Tensor:
        return nn.functional.softplus(self.raw_noise) + self.min_noise

    @property
    def num_blocks(self) -> int:
        return self.block_index.shape[0]

    def _k(self, x1: Tensor, x2: Tensor) -> Tensor:
        return self.kernel.forward(x1, x2)

    def _factor(self, blocks: Tensor | None = None) -> _Factor:
        """Everything the density and the predictive share, per code dimension: over every
        block, or over ``blocks`` only (the cost then scales with them, not with ``n``)."""
        e = self.num_outputs
        xp = self.inducing  # (e, m, D)
        m = xp.shape[1]
        eye_m = torch.eye(m, dtype=torch.float64)
        kpp = self._k(xp, xp) + 1e-6 * self.kernel.outputscale[:, None, None] * eye_m
        lpp = torch.linalg.cholesky(kpp)
        idx, mask = self.block_index, self.block_mask
        if blocks is not None:
            idx, mask = idx[blocks], mask[blocks]
        p, width = idx.shape
        xb = self.tau[idx]  # (p, B, D)
        kbp = self._k(xb.reshape(1, p * width, -1).expand(e, -1, -1), xp)  # (e, pB, m)
        vb = torch.linalg.solve_triangular(lpp, kbp.transpose(-1, -2), upper=False)  # (e, m, pB)
        vb = vb.transpose(-1, -2).reshape(e, p, width, m) * mask[..., None]  # (e, p, B, m)
        xb = xb[:, None].expand(-1, e, -1, -1)  # kernel batch dims sit last: (p, e, B, D)
        kbb = self._k(xb, xb).transpose(0, 1)  # (e, p, B, B)
        qbb = vb @ vb.transpose(-1, -2)
        pair = mask[:, :, None] & mask[:, None, :]
        eye_b = torch.eye(width, dtype=torch.float64)
        d = torch.where(pair, kbb - qbb, torch.zeros(())) + eye_b * torch.where(
            mask, self.noise[:, None, None], torch.ones(())
        )[..., None]
        ld = torch.linalg.cholesky(d)
        a = torch.cholesky_solve(vb, ld)  # D^-1 U, (e, p, B, m)
        scale = 1.0 if blocks is None else self.num_blocks / p
        c = eye_m + scale * torch.einsum("epbm,epbk->emk", vb, a)
        lc = torch.linalg.cholesky(c)
        return _Factor(lpp, vb, ld, a, lc, idx, mask, scale)

    @staticmethod
    def _pad(x: Tensor, index: Tensor, mask: Tensor) -> Tensor:
        """``(n, e)`` per-task values into the padded block layout ``(e, p, B)``."""
        return (x.double().T[:, index]) * mask

    def _precision(self, f: _Factor) -> _Precision:
        """The pieces of ``Sigma^-1 = D^-1 - A C^-1 A^T`` (``A = D^-1 U``) and ``log|Sigma|``
        that the density, the frozen density and the predictive all use."""
        e, p, width, m = f.a.shape
        cinv = torch.cholesky_inverse(f.lc)
        dinv = torch.cholesky_inverse(f.ld)
        ac = (f.a.reshape(e, p * width, m) @ cinv).reshape(f.a.shape)  # Sigma^-1 U, per block
        logdet = 2 * f.scale * torch.log(torch.diagonal(f.ld, dim1=-2, dim2=-1)).sum((1, 2))
        logdet = logdet + 2 * torch.log(torch.diagonal(f.lc, dim1=-2, dim2=-1)).sum(-1)
        return _Precision(dinv, cinv, ac, f.a, f.vb, logdet,
                          torch.diagonal(dinv, dim1=-2, dim2=-1) - (ac * f.a).sum(-1), f.index, f.mask, f.scale)

    @staticmethod
    def _unpad(x: Tensor, c: _Precision) -> Tensor:
        """Padded ``(e, p, B)`` values back to ``(n, e)`` (every block: each task has one slot)."""
        out = torch.zeros(int(c.mask.sum()), x.shape[0], dtype=x.dtype)
        out[c.index[c.mask]] = x[:, c.mask].T
        return out

    @staticmethod
    def _solve(c: _Precision, mu: Tensor) -> Tensor:
        """``Sigma^-1 mu`` for padded ``mu`` ``(e, p, B)`` by Woodbury, ``D^-1 mu - A C^-1 U^T D^-1 mu``
        (the coupling's sum rescaled for a subset of blocks); plain batched products, which do
        not copy the ``(e, p, B, B)`` operands as einsum did."""
        e, p, width, m = c.vb.shape
        dmu = (c.dinv @ mu[..., None])[..., 0]
        t = c.scale * (dmu.reshape(e, 1, p * width) @ c.vb.reshape(e, p * width, m))  # (e, 1, m)
        return dmu - (c.ac.reshape(e, p * width, m) @ t.transpose(1, 2)).reshape(e, p, width)

    def _value(self, c: _Precision, mu: Tensor, solved: Tensor, var: Tensor | None) -> Tensor:
        """The expected log-density from padded means, ``Sigma^-1`` times them and variances."""
        quad = c.scale * (mu * solved).sum((1, 2))
        trace = 0.0 if var is None else c.scale * (c.diag * self._pad(var, c.index, c.mask)).sum((1, 2))
        return (-0.5 * (self.tau.shape[0] * LOG_2PI + c.logdet + quad + trace)).sum()

    def _density(self, c: _Precision, mean: Tensor, var: Tensor | None) -> Tensor:
        mu = self._pad(mean, c.index, c.mask)
        return self._value(c, mu, self._solve(c, mu), var)

    # -- prior density -----------------------------------------------------------------------------
    def expected_log_prob(self, mean: Tensor, var: Tensor | None = None, blocks: Tensor | None = None) -> Tensor:
        """``sum_kappa E_q log N(w^kappa | 0, Sigma^kappa)`` for ``q(w_i) = N(mean_i, diag var_i)``.

        ``mean``/``var``: ``(n, e)``. With ``var=None`` it is the plain log-density at ``mean``.
        ``blocks``: estimate it from these blocks alone (stochastic blocks): every sum over blocks
        (of ``log|D_o|``, ``mu_o^T D_o^-1 mu_o``, the trace, and ``U^T D^-1 U``, ``U^T D^-1 mu``
        inside the coupling through ``tau+``) is taken over them and rescaled to all blocks, so
        its cost is that of the blocks chosen, not of ``n``; with every block it is the density.
        """
        return self._density(self._precision(self._factor(blocks)), mean, var)

    @torch.no_grad()
    def frozen(self) -> FrozenPrior:
        """The prior factored once for the current hyperparameters: its expected log-density
        then costs ``O(n m + sum_o n_o^2)`` and differentiates only through the codes."""
        return FrozenPrior(self, self._precision(self._factor()))

    # -- predictive -----------------------------------------------------------------------------------
    @torch.no_grad()
    def condition(self, mean: Tensor) -> None:
        """Cache what the predictive needs given the training codes' posterior means ``(n, e)``.
        Costs one factorization; each later prediction is ``O(m^2 + B m + B^2)``."""
        f = self._factor()
        c = self._precision(f)
        m = c.cinv.shape[-1]
        alpha = self._solve(c, self._pad(mean, c.index, c.mask)) * self.block_mask
        self._predictive = _Predictive(
            lpp=f.lpp, alpha=alpha, v_alpha=torch.einsum("epbm,epb->em", c.vb, alpha),
            m_mat=torch.eye(m, dtype=torch.float64) - c.cinv, p_blocks=c.ac,
            s_rr=c.dinv - c.ac @ c.a.transpose(-1, -2), vb=c.vb,
            prior_var=self.kernel.outputscale.detach().clone(), noise=self.noise.detach().clone())

    @torch.no_grad()
    def loo_mean(self, codes: Tensor, index: Tensor, neighbours: int = 256, chunk: int = 16) -> Tensor:
        """``(q, e)``: the codes of training tasks ``index`` predicted from the *other* tasks'
        ``codes`` ``(n, e)`` by the exact GP with this prior's kernel and noise, on each task's
        ``neighbours`` nearest others (all of them in zoos up to ``neighbours + 1``): close to
        what a new task at their descriptor is decoded from (the PIC predictive approximates
        the same GP), without their own fitted code."""
        n, e = codes.shape
        if n < 2 or neighbours < 1:
            raise ValueError("a leave-one-out prediction needs at least two tasks and one neighbour")
        x, y = self.tau, codes.double()
        scaled = x / self.kernel.base_kernel.lengthscale.detach().mean(0)  # (n, D): the dims' mean lengthscales
        m = min(neighbours, n - 1)
        noise = self.noise.detach()[:, None, None] * torch.eye(m, dtype=torch.float64)
        out = []
        for rows in index.split(chunk):  # distances per chunk: (chunk, n), not (q, n), on large zoos
            dist = torch.cdist(scaled[rows], scaled)
            dist[torch.arange(len(rows)), rows] = math.inf
            part = dist.topk(m, largest=False).indices  # (c, m)
            others = x[part][:, None].expand(-1, e, -1, -1)  # (c, e, m, D)
            k = self._k(others, others) + noise
            ks = self._k(x[rows][:, None, None, :].expand(-1, e, -1, -1), others)  # (c, e, 1, m)
            target = y[part].transpose(1, 2)[..., None]  # (c, e, m, 1)
            out.append((ks @ torch.cholesky_solve(target, torch.linalg.cholesky(k)))[:, :, 0, 0])
        return torch.cat(out).float()

    @torch.no_grad()
    def nearest_block(self, tau_star: Tensor) -> Tensor:
        return torch.cdist(tau_star.double(), self.centres).argmin(1)

    @torch.no_grad()
    def predict(self, tau_star: Tensor) -> tuple[Tensor, Tensor]:
        """PIC predictive mean and variance ``(q, e)`` of the code of each new task ``(q, D)``:
        the representative tasks plus the block of the nearest k-means centre (Eq. 3-5)."""
        if self._predictive is None:
            raise RuntimeError("call condition() before predict()")
        c = self._predictive
        x = tau_star.double()
        e = self.num_outputs
        r = self.nearest_block(x)
        idx, mask = self.block_index[r], self.block_mask[r]  # (q, B)
        q, m = x.shape[0], self.inducing.shape[1]
        # one kernel call against the inducing inputs and the block's tasks together
        others = torch.cat([self.inducing.expand(q, -1, -1, -1), self.tau[idx][:, None].expand(-1, e, -1, -1)], 2)
        k_s = self._k(x[:, None, None, :].expand(-1, e, -1, -1), others)[:, :, 0].transpose(0, 1)  # (e, q, m + B)
        k_sp, k_sr = k_s[..., :m], k_s[..., m:]
        v_s = torch.linalg.solve_triangular(c.lpp, k_sp.transpose(-1, -2), upper=False)
        v_s = v_s.transpose(-1, -2)  # (e, q, m)
        # products as batched matmuls, not einsums: on a served request (q = 1) einsum's own
        # overhead was half the cost of each
        vb_r = c.vb[:, r]  # (e, q, B, m)
        delta = (k_sr - (vb_r @ v_s[..., None])[..., 0]) * mask  # (e, q, B)
        mean = (v_s * c.v_alpha[:, None, :]).sum(-1) + (delta * c.alpha[:, r]).sum(-1)
        explained = (
            ((v_s @ c.m_mat) * v_s).sum(-1)
            + 2 * ((c.p_blocks[:, r] @ v_s[..., None])[..., 0] * delta).sum(-1)
            + ((c.s_rr[:, r] @ delta[..., None])[..., 0] * delta).sum(-1)
        )
        var = (c.prior_var[:, None] - explained).clamp_min(0) + c.noise[:, None]
        return mean.T.float(), var.T.float()
