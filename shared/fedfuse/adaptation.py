"""A device adapting its personalized initializer to its own few shots, under the posterior.

The readout (the last linear map) moves along the directions the zoo's functions vary in and
only as far as the prior allows; the hidden layers stay as the server sent them. Each device
picks how strongly its shots pull by cross-validation on its own shots, and keeps its
initializer unless an update predicts held-out shots better.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedfuse.architectures import Architecture
from fedfuse.posterior import ReadoutGaussian
from fedfuse.readout import design, set_readout

# how strongly a device's shots may pull against the prior; each device picks by cross-validation
STRENGTHS = {"mse": (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0), "ce": (0.3, 1.0, 3.0, 10.0)}
# by how many standard errors an update must beat the initializer on held-out shots. "mse": the
# smallest t in (0, 1, 2, 3) that left at most 5 % of the zoo's own pseudo-devices worse than their
# initializer at 10-40 shots on each of the three sine bench zoos (benchmarks/adaptation.py: t = 1
# left 6-17 %, t = 2 at most 4 %); "ce": one standard error (MNIST: 2-6 % of tasks worse at 10 shots)
THRESHOLDS = {"mse": 2.0, "ce": 1.0}


def _shot_loss(pred: Tensor, y: Tensor, loss: str) -> Tensor:
    """Per-shot loss ``(q, k)``: squared error summed over outputs, or cross-entropy."""
    if loss == "mse":
        return ((pred - y) ** 2).sum(-1)
    return torch.nn.functional.cross_entropy(pred.transpose(1, 2), y, reduction="none")


def _shot_error(pred: Tensor, y: Tensor, loss: str) -> Tensor:
    """Per-shot error ``(q, k)`` an update is judged by: the squared error, or for classes
    whether the shot is misclassified among the classes the device's shots contain."""
    if loss == "mse":
        return _shot_loss(pred, y, loss)
    seen = torch.zeros(pred.shape[0], pred.shape[-1], dtype=torch.bool).scatter_(1, y, True)
    guess = pred.masked_fill(~seen[:, None, :], float("-inf")).argmax(-1)
    return (guess != y).float()


def _map_readout(phi: Tensor, prior: ReadoutGaussian, y: Tensor, weight: Tensor, loss: str,
                 scale: Tensor, max_iter: int) -> Tensor:
    """MAP readouts ``(q, p)`` under the Gaussian prior given the shots weighted by ``weight``
    ``(q, k)``; ``scale`` ``(q,)`` divides the data term (``2 noise`` for a Gaussian
    likelihood, 1 for cross-entropy). L-BFGS in the prior's whitened coordinates."""
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


def condition_readout(spec: Architecture, mean: Tensor, prior: ReadoutGaussian, x: Tensor, y: Tensor,
                      loss: str = "mse", strengths: tuple[float, ...] | None = None,
                      folds: int = 5, max_iter: int = 100, threshold: float | None = None) -> Tensor:
    """The MAP readout of each network given its shots under the posterior's Gaussian readout
    prior, hidden layers unchanged: ``(q, d)`` weights.

    A device's few shots move the readout only along the directions the zoo says functions vary
    in, and only as far as the prior allows; with fewer than 2 shots it returns ``mean``. The data
    term is divided by a strength ``c`` (for ``mse``: the shots' noise variance is ``c`` times the prior's
    predictive variance at them; for cross-entropy a temperature). Each device picks its own
    ``c`` by cross-validation on its shots (refit without each of ``folds`` parts, predict
    them), and keeps its initializer unless the update's held-out error (squared error;
    misclassification for classes) beats the initializer's by more than ``threshold`` standard
    errors (default: :data:`THRESHOLDS` of the loss): an update is never taken on faith. The
    problem is convex in the readout (least squares or cross-entropy plus a Gaussian penalty).
    """
    k = x.shape[-2]
    if k < 2:  # nothing to validate an update with
        return mean.clone()
    strengths = strengths or STRENGTHS[loss]
    threshold = THRESHOLDS[loss] if threshold is None else threshold
    phi = design(spec, mean, x).float()  # (q, k, h + 1)
    q, p = prior.loc.shape
    h1 = phi.shape[-1]
    out = p // h1
    if loss == "mse":
        f = prior.factor.float().reshape(q, h1, out, -1)
        var = torch.einsum("qkh,qhcr->qkcr", phi, f).pow(2).sum(-1)
        var = var + torch.einsum("qkh,qhc->qkc", phi**2, prior.diag.float().reshape(q, h1, out))
        unit = 2 * var.mean((1, 2)).clamp_min(1e-12)
    else:
        unit = torch.ones(q)
    with torch.no_grad():
        zero = phi @ prior.loc.float().reshape(q, h1, out)
        base = _shot_error(zero, y, loss)  # (q, k)
    f = min(folds, k)
    held = torch.arange(k)[None, :] % f == torch.arange(f)[:, None]  # (f, k): every shot held out once
    rep = lambda t: t.repeat_interleave(f, 0)  # noqa: E731
    cv_prior = ReadoutGaussian(rep(prior.loc), rep(prior.factor), rep(prior.diag))
    losses, errors = [], []
    for c in strengths:
        cv = _map_readout(rep(phi), cv_prior, rep(y), (~held).float().repeat(q, 1), loss, rep(c * unit), max_iter)
        with torch.no_grad():
            pred, mask = rep(phi) @ cv.reshape(q * f, h1, out), held.repeat(q, 1)
            losses.append((_shot_loss(pred, rep(y), loss) * mask).reshape(q, f, k).sum(1))
            errors.append((_shot_error(pred, rep(y), loss) * mask).reshape(q, f, k).sum(1))
    pick = torch.stack(losses).sum(-1).argmin(0)  # (q,) each device's strength, by held-out loss
    gain = torch.stack(errors)[pick, torch.arange(q)] - base  # (q, k) held-out error against the initializer's
    se = gain.std(-1) / k**0.5
    accept = gain.mean(-1) + threshold * se < 0  # better by more than `threshold` standard errors
    best = prior.loc.float().clone()
    for s_idx, c in enumerate(strengths):
        rows = torch.nonzero(accept & (pick == s_idx)).flatten()
        if len(rows):
            sub = ReadoutGaussian(prior.loc[rows], prior.factor[rows], prior.diag[rows])
            best[rows] = _map_readout(phi[rows], sub, y[rows], torch.ones(len(rows), k), loss, c * unit[rows], max_iter)
    return set_readout(spec, mean, best.reshape(q, h1, out))
