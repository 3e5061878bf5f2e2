"""A device adapting its personalized initializer to its own few shots, under the posterior.

The readout (the last linear map) moves along the directions the zoo's functions vary in and
only as far as the prior allows; the hidden layers stay as the server sent them. Each device
picks how strongly its shots pull by cross-validation on its own shots, and keeps its
initializer unless an update predicts held-out shots better.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
from scipy.special import ndtr, stdtrit
from torch import Tensor

from fedfuse.architectures import Architecture
from fedfuse.posterior import ReadoutGaussian
from fedfuse.readout import design, set_readout

# how strongly a device's shots may pull against the prior; each device picks by cross-validation
STRENGTHS = {"mse": (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0), "ce": (0.3, 1.0, 3.0, 10.0)}


@dataclass(frozen=True)
class Acceptance:
    """When a device takes an update of its readout, and how much of it.

    ``threshold``: by how many standard errors the update must beat the initializer on held-out
    shots, read as a one-sided test at the normal level ``Phi(threshold)``: the standard error
    comes from the device's own ``k`` shots, so a positive margin is Student's ``t`` quantile at
    that level with ``k - 1`` degrees of freedom (two standard errors at 10 shots: 2.32; at 3
    shots: 4.53, where a normal margin takes a lucky pair of held-out shots on faith).
    ``shrink``: the share of the update taken (and judged), between the initializer and the MAP
    readout: for squared error a shorter step is worse than the initializer on a subset of the
    tasks the full step harms. ``any_strength``: take the best strength whose update
    clears the margin, not only the cross-validation's best (a weaker pull can be significant
    where a stronger one is not). ``folds``: how the device's shots are split to judge updates.
    ``absolute``: for squared error, judge the update by the held-out shots' absolute errors
    rather than their squared ones (a few large squared errors dominate the mean and the
    spread alike, so the paired test on them is weak; the strength is still chosen by squared
    error; classes are judged by misclassification either way).
    ``misfit_cut``: for squared error, a device whose initializer misses its own shots by at least
    this much (:func:`shot_misfit`) judges updates at ``misfit_threshold`` instead: an initializer
    that already fits the shots has little left to gain and an update mostly adds error, one that
    misses them has much to gain (on sine, the updates that harm sit among the tasks whose
    initializer is already best).
    """

    threshold: float
    shrink: float = 1.0
    any_strength: bool = False
    folds: int | None = 5  # the cross-validation's parts; None: every shot held out alone
    absolute: bool = False
    misfit_cut: float | None = None
    misfit_threshold: float = 1.0

    def margin(self, k: int) -> float:
        """The margin in standard errors for ``k`` held-out shots (Student's ``t``, ``k - 1``
        degrees of freedom, at the level a normal ``threshold`` has); a margin of 0 or below
        is taken as it is."""
        return _student_margin(self.threshold, k)

    def margins(self, k: int, misfit: Tensor) -> Tensor:
        """Each device's margin ``(q,)`` given its initializer's ``misfit`` ``(q,)`` on its ``k``
        shots: :meth:`margin`, or ``misfit_threshold``'s where the misfit reaches ``misfit_cut``."""
        margin = torch.full(misfit.shape, self.margin(k))
        if self.misfit_cut is None:
            return margin
        return torch.where(misfit >= self.misfit_cut, _student_margin(self.misfit_threshold, k), margin)


def _student_margin(threshold: float, k: int) -> float:
    """Student's ``t`` quantile with ``k - 1`` degrees of freedom at the level ``Phi(threshold)``
    (``threshold`` itself where it is 0 or below)."""
    if threshold <= 0:
        return threshold
    tail = float(ndtr(-threshold))  # the upper tail's mass, exact where 1 - ndtr rounds to 0
    return -float(stdtrit(k - 1, tail)) if tail > 0 else math.inf


def shot_misfit(pred: Tensor, y: Tensor) -> Tensor:
    """``(q,)``: how far predictions ``(q, k, out)`` miss a device's shots ``y``: the RMS error
    over the range of the shots' values (what the device alone can tell of its initializer's
    error, scale-free across tasks)."""
    rms = ((pred.double() - y.double()) ** 2).mean((1, 2)).sqrt()
    return (rms / (y.double().amax((1, 2)) - y.double().amin((1, 2))).clamp_min(1e-12)).float()


# the device's rule per loss and initializer (fast, or distilled: the initializer says which).
# "mse": of 416 rules (margin 0-3 in half standard errors, shrink 1-0.35, either selection, 5-fold or
# leave-one-out, held-out shots judged by squared or absolute error; and 192 that judge at a smaller margin
# where the initializer misses the device's own shots by 1-3 % of their range), the one with the lowest mean
# error on the three sine bench zoos' pseudo-devices among those leaving at most 5 % of them worse than their
# initializer at every shot count of 10-40 on every zoo, and at most 5 % of the new devices of each of three
# validation families (pseudo-devices understate the harm real devices meet): the bump, noisy step and
# noisy two-input wave examples, 6 fresh zoos each, per path (benchmarks/adaptation.py [--distill],
# benchmarks/rule_transfer.py --sine --also). Both paths (2026-12-08): absolute error, any strength that
# clears 3 (fast) or 2.5 (distilled) standard errors, 5-fold, or 2 where the initializer misses the shots by
# 1 % or more. "ce": one standard error, Student's too (MNIST: 0-6 % of tasks worse at 10 shots, 0-2 %
# distilled)
RULES = {("mse", False): Acceptance(3.0, any_strength=True, folds=5, absolute=True, misfit_cut=0.01, misfit_threshold=2.0),
         ("mse", True): Acceptance(2.5, any_strength=True, folds=5, absolute=True, misfit_cut=0.01, misfit_threshold=2.0),
         ("ce", False): Acceptance(1.0), ("ce", True): Acceptance(1.0)}


def _shot_loss(pred: Tensor, y: Tensor, loss: str) -> Tensor:
    """Per-shot loss ``(q, k)``: squared error summed over outputs, or cross-entropy."""
    if loss == "mse":
        return ((pred - y) ** 2).sum(-1)
    return torch.nn.functional.cross_entropy(pred.transpose(1, 2), y, reduction="none")


def _shot_error(pred: Tensor, y: Tensor, loss: str, absolute: bool = False) -> Tensor:
    """Per-shot error ``(q, k)`` an update is judged by: the squared (or ``absolute``) error
    summed over outputs, or for classes whether the shot is misclassified among the classes
    the device's shots contain."""
    if loss == "mse":
        return (pred - y).abs().sum(-1) if absolute else _shot_loss(pred, y, loss)
    seen = torch.zeros(pred.shape[0], pred.shape[-1], dtype=torch.bool).scatter_(1, y, True)
    guess = pred.masked_fill(~seen[:, None, :], float("-inf")).argmax(-1)
    return (guess != y).float()


def _map_readout(phi: Tensor, prior: ReadoutGaussian, y: Tensor, weight: Tensor, loss: str,
                 scale: Tensor, max_iter: int) -> Tensor:
    """MAP readouts ``(q, p)`` for classes under the Gaussian prior given the shots weighted by
    ``weight`` ``(q, k)``; ``scale`` ``(q,)`` divides the data term (a temperature). L-BFGS in
    the prior's whitened coordinates (squared error has the exact :func:`_posterior_readout`)."""
    q, p = prior.loc.shape
    h1 = phi.shape[-1]
    loc, factor, diag = prior.loc.float(), prior.factor.float(), prior.diag.float()
    z = torch.zeros(q, factor.shape[-1], requires_grad=True)
    eta = torch.zeros(q, p, requires_grad=True)
    opt = torch.optim.LBFGS([z, eta], max_iter=max_iter, line_search_fn="strong_wolfe")

    def objective() -> Tensor:
        opt.zero_grad()
        readout = (loc + (factor @ z[..., None])[..., 0] + diag.sqrt() * eta).reshape(q, h1, -1)
        data = (_shot_loss(phi @ readout, y, loss) * weight).sum(1) / scale
        total = (data + 0.5 * (z**2).sum(1) + 0.5 * (eta**2).sum(1)).sum()
        total.backward()
        return total

    opt.step(objective)
    with torch.no_grad():
        return loc + (factor @ z[..., None])[..., 0] + diag.sqrt() * eta


def _shot_covariance(phi: Tensor, prior: ReadoutGaussian) -> Tensor:
    """``(q, n, n)``, ``n = k * out``: the prior covariance of the outputs at the shots (shot
    by shot, outputs within), in double precision."""
    q, k, h1 = phi.shape
    out = prior.loc.shape[1] // h1
    phi = phi.double()
    g = torch.einsum("qkh,qhcr->qkcr", phi, prior.factor.double().reshape(q, h1, out, -1)).reshape(q, k * out, -1)
    d = torch.einsum("qkh,qlh,qhc->qkcl", phi, phi, prior.diag.double().reshape(q, h1, out))
    eye = torch.eye(out, dtype=torch.float64)
    return g @ g.transpose(1, 2) + torch.einsum("qkcl,cd->qkcld", d, eye).reshape(q, k * out, k * out)


def _gaussian_solve(cov: Tensor, residual: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
    """``(A^-1, A^-1 r)`` for ``A = cov + noise I``: the exact MAP of a Gaussian likelihood.
    A device whose ``A`` cannot be factored (non-finite shots) gets NaN rows, so no rule takes an
    update for it, and the other devices of the batch are unaffected."""
    a = cov + noise.double()[:, None, None] * torch.eye(cov.shape[-1], dtype=torch.float64)
    factor, info = torch.linalg.cholesky_ex(a.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0))
    bad = (info != 0) | ~torch.isfinite(a).all((1, 2)) | ~torch.isfinite(residual).all(1)
    factor[bad] = torch.eye(a.shape[-1], dtype=torch.float64)
    inv = torch.cholesky_inverse(factor)
    inv[bad] = float("nan")
    return inv, (inv @ residual.nan_to_num()[..., None])[..., 0]


def _posterior_readout(phi: Tensor, prior: ReadoutGaussian, alpha: Tensor) -> Tensor:
    """The exact MAP readouts ``(q, p)`` under the Gaussian prior, ``loc + S Phi^T alpha``, from
    :func:`_gaussian_solve`'s ``alpha = A^-1 r`` ``(q, k * out)`` for the shots' residuals."""
    q, k, _ = phi.shape
    v = torch.einsum("qkh,qkc->qhc", phi.double(), alpha.reshape(q, k, -1)).reshape(q, -1)
    factor = prior.factor.double()
    return (prior.loc.double() + (factor @ (factor.transpose(1, 2) @ v[..., None]))[..., 0]
            + prior.diag.double() * v).float()


@dataclass
class CrossValidation:
    """A device's held-out predictions of its shots under each strength: what every
    :class:`Acceptance` rule decides from (computed once, judged under many rules)."""

    spec: Architecture
    mean: Tensor  # (q, d)
    prior: ReadoutGaussian
    phi: Tensor  # (q, k, h + 1): the hidden layer's features at the shots
    y: Tensor
    loss: str
    strengths: tuple[float, ...]
    unit: Tensor  # (q,): the data term's scale at strength 1 (for mse twice the noise variance)
    zero: Tensor  # (q, k, out): the initializer's predictions of the shots
    held_out: Tensor  # (S, q, k, out): each shot predicted by the MAP readout solved without its fold
    alpha: Tensor | None  # (S, q, k * out): A^-1 r with every shot, per strength (squared error)
    max_iter: int

    @cached_property
    def misfit(self) -> Tensor:
        """``(q,)``: how far the initializer misses the shots (:func:`shot_misfit`; 0 for classes),
        once for every rule judged on this cross-validation."""
        return shot_misfit(self.zero, self.y) if self.loss == "mse" else torch.zeros(self.zero.shape[0])

    def conditioned(self, rule: Acceptance) -> Tensor:
        """The device's weights ``(q, d)`` under ``rule``."""
        q, k = self.zero.shape[:2]
        shrunk = self.zero + rule.shrink * (self.held_out - self.zero)
        ys = self.y.repeat(len(self.strengths), *(1,) * (self.y.dim() - 1))
        losses = _shot_loss(shrunk.flatten(0, 1), ys, self.loss)
        errors = _shot_error(shrunk.flatten(0, 1), ys, self.loss, rule.absolute)
        losses, errors = losses.reshape(-1, q, k).sum(-1), errors.reshape(-1, q, k)
        gain = errors - _shot_error(self.zero, self.y, self.loss, rule.absolute)  # (S, q, k) against the initializer's
        clears = gain.mean(-1) + rule.margins(k, self.misfit) * gain.std(-1) / k**0.5 < 0  # (S, q)
        if rule.any_strength:
            pick = losses.masked_fill(~clears, float("inf")).argmin(0)
            accept = clears.any(0)
        else:
            pick = losses.argmin(0)  # (q,) each device's strength, by held-out loss
            accept = clears[pick, torch.arange(q)]
        loc = self.prior.loc.float()
        best = loc.clone()
        for s_idx, c in enumerate(self.strengths):
            rows = torch.nonzero(accept & (pick == s_idx)).flatten()
            if len(rows):
                sub = ReadoutGaussian(self.prior.loc[rows], self.prior.factor[rows], self.prior.diag[rows])
                if self.alpha is not None:  # the update's solve is the cross-validation's
                    full = _posterior_readout(self.phi[rows], sub, self.alpha[s_idx, rows])
                else:
                    full = _map_readout(self.phi[rows], sub, self.y[rows], torch.ones(len(rows), k), self.loss,
                                        c * self.unit[rows], self.max_iter)
                best[rows] = loc[rows] + rule.shrink * (full - loc[rows])
        h1 = self.phi.shape[-1]
        return set_readout(self.spec, self.mean, best.reshape(q, h1, -1))


def cross_validate(spec: Architecture, mean: Tensor, prior: ReadoutGaussian, x: Tensor, y: Tensor,
                   loss: str = "mse", strengths: tuple[float, ...] | None = None, folds: int | None = 5,
                   max_iter: int = 100) -> CrossValidation:
    """Each device's shots predicted without their own fold (``folds`` parts, each shot held out
    once; ``None``: each shot alone), under each strength ``c`` of the data term: ``k >= 2``
    shots ``x`` ``(q, k, in)``. For squared error the MAP is a Gaussian posterior mean, so every
    fold's prediction is exact algebra on one solve; for classes each fold is an L-BFGS fit."""
    k = x.shape[-2]
    strengths = strengths or STRENGTHS[loss]
    phi = design(spec, mean, x).float()  # (q, k, h + 1)
    q, p = prior.loc.shape
    h1 = phi.shape[-1]
    out = p // h1
    with torch.no_grad():
        zero = phi @ prior.loc.float().reshape(q, h1, out)
    f = k if folds is None else min(folds, k)
    held = torch.arange(k)[None, :] % f == torch.arange(f)[:, None]  # (f, k): every shot held out once
    held_out, alphas = [], []
    if loss == "mse":
        cov = _shot_covariance(phi, prior)
        unit = 2 * torch.diagonal(cov, dim1=1, dim2=2).mean(-1).clamp_min(1e-12)
        residual = (y.double() - zero.double()).reshape(q, k * out)
        for c in strengths:
            inv, alpha = _gaussian_solve(cov, residual, c * unit / 2)
            pred = torch.empty(q, k * out, dtype=torch.float64)
            for part in held:  # a fold's held-out residual: (A^-1)_BB^-1 (A^-1 r)_B
                idx = part.repeat_interleave(out).nonzero().flatten()
                pred[:, idx] = residual[:, idx] - torch.linalg.solve(inv[:, idx][:, :, idx], alpha[:, idx])
            held_out.append((pred.reshape(q, k, out) + zero.double()).float())
            alphas.append(alpha)
        unit = unit.float()
    else:
        unit = torch.ones(q)
        rep = lambda t: t.repeat_interleave(f, 0)  # noqa: E731
        cv_prior = ReadoutGaussian(rep(prior.loc), rep(prior.factor), rep(prior.diag))
        for c in strengths:
            cv = _map_readout(rep(phi), cv_prior, rep(y), (~held).float().repeat(q, 1), loss, rep(c * unit), max_iter)
            with torch.no_grad():
                pred, mask = rep(phi) @ cv.reshape(q * f, h1, out), held.repeat(q, 1)
                held_out.append((pred * mask[..., None]).reshape(q, f, k, out).sum(1))
    return CrossValidation(spec, mean, prior, phi, y, loss, tuple(strengths), unit, zero, torch.stack(held_out),
                           torch.stack(alphas) if alphas else None, max_iter)


def condition_readout(spec: Architecture, mean: Tensor, prior: ReadoutGaussian, x: Tensor, y: Tensor,
                      loss: str = "mse", strengths: tuple[float, ...] | None = None,
                      max_iter: int = 100, rule: Acceptance | None = None, distilled: bool = False) -> Tensor:
    """The MAP readout of each network given its shots under the posterior's Gaussian readout
    prior, hidden layers unchanged: ``(q, d)`` weights.

    A device's few shots move the readout only along the directions the zoo says functions vary
    in, and only as far as the prior allows; with fewer than 2 shots it returns ``mean``. The data
    term is divided by a strength ``c`` (for ``mse``: the shots' noise variance is ``c`` times the prior's
    predictive variance at them; for cross-entropy a temperature). Each device picks its own
    ``c`` by cross-validation on its shots (:func:`cross_validate`), and keeps its initializer
    unless the update's held-out error (squared or absolute error, as the rule says;
    misclassification for classes) beats the
    initializer's by the ``rule``'s margin (default: :data:`RULES` of the loss and of the path
    that made the initializer, ``distilled``): an update is never taken on faith. The problem is
    convex in the readout (least squares or cross-entropy plus a Gaussian penalty).
    """
    if x.shape[-2] < 2:  # nothing to validate an update with
        return mean.clone()
    rule = RULES[loss, distilled] if rule is None else rule
    return cross_validate(spec, mean, prior, x, y, loss, strengths, rule.folds, max_iter).conditioned(rule)
