"""Outlier screening: models whose function disagrees with what their descriptor implies, and
descriptors far from every other one, are excluded before the fit.

Each model gets a permutation-invariant signature: its outputs on the server's probe inputs
when there are any (the function itself), else the sorted magnitudes of each weight tensor.
Descriptors are put on a robust scale (median and MAD, :func:`fedfuse.zoo.robust_scale`), so
one extreme descriptor cannot stretch everyone else's distances; a descriptor farther than
``threshold`` robust units from every other one is excluded outright (nothing can vouch for
it). That distance is the root mean square over the descriptor's entries: honest neighbours sit
about ``sqrt(D)`` times farther apart in ``D`` entries than in one, so a plain Euclidean bar
would isolate more honest devices the longer the descriptor (800 MovieLens users with
32-number descriptors: 22/27/46 of them on seeds 0/1/2 at 10 robust units, none per entry). The
price: a descriptor far off in a few entries of a long one is no longer isolated (35 units in
one of 32 entries is 6 per entry); it is then judged by its function like every other. Every
other model is judged against a prediction of its signature from its ``K`` nearest neighbours
by descriptor: a local linear fit (signature ~ descriptor) made robust three ways, so that
colluders who claim nearby descriptors cannot vouch for each other:

- the reference is wide: ``K = max(2 k, 2.5 collusion n)`` neighbours (and at least twice the
  local fit's parameters), so that a colluding group of up to ``collusion n`` devices is at most
  40 % of any model's reference;
- no neighbourhood weighs more than its share: each neighbour counts ``1 / (the number of
  models within the zoo's typical k-th-neighbour distance of it)``, so a tight group of claims
  counts about as much as one model's neighbourhood;
- the fit starts from the weighted median and redescends (Tukey biweight, three rounds):
  neighbours far from the fit lose their weight.

A model's score is its distance to the prediction in units of how far the neighbours'
functions sit from their median (a local scale: regions of small or large outputs are judged
alike); a robust z-score of the scores over the zoo (median and MAD) above ``threshold``
excludes it. Passes repeat, each judging every model against references without the last
pass's exclusions, until the exclusions stop changing.

Limits: a colluding group larger than ``MAX_REFERENCE / 2.5`` devices, or one that outnumbers
the honest devices of its region at their own density, is a local majority no screening by
neighbours can outvote; devices that collude on descriptors far from every honest task are
judged only by each other (but then only tasks out there are predicted from them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import Tensor

from fedfuse.zoo import ModelZoo, robust_scale

TUKEY_CUT = 3.0  # a neighbour more than this many typical distances from the fit gets no weight
IRLS_ROUNDS = 3
MAX_PASSES = 4
MAX_REFERENCE = 256  # neighbours a model is judged against, at most (bounds the cost in large zoos)
DISTANCE_ROWS = 1024  # rows of pairwise distances held at once
RIDGE = 1e-3  # on the local slopes, relative to the reference's total weight


@dataclass
class ScreeningReport:
    excluded: list[str] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)  # robust z-score per model judged (not isolated)
    reasons: dict[str, str] = field(default_factory=dict)  # why each excluded model was
    threshold: float = 0.0
    signature: str = ""

    def as_dict(self) -> dict:
        return {"excluded": self.excluded, "reasons": self.reasons, "threshold": self.threshold,
                "signature": self.signature, "max_score": max(self.scores.values(), default=0.0)}


def signatures(zoo: ModelZoo, probe: Tensor | None) -> Tensor:
    if probe is not None and not zoo.spec.is_vector:
        with torch.no_grad():
            return zoo.spec.forward(zoo.weights, probe.float()).flatten(1)
    parts = [p.flatten(1).abs().sort(dim=1).values for p in zoo.spec.unflatten(zoo.weights).values()]
    return torch.cat(parts, dim=1)


def screen(zoo: ModelZoo, probe: Tensor | None = None, k: int = 8, threshold: float = 10.0,
           collusion: float = 0.1) -> tuple[ModelZoo, ScreeningReport]:
    """The zoo without its outliers, and a report of what was excluded and why. ``collusion``:
    the fraction of devices that may collude (claim nearby descriptors) the screening is built
    to withstand (up to ``MAX_REFERENCE / 2.5`` devices)."""
    n = len(zoo)
    report = ScreeningReport(threshold=threshold, signature="probe outputs" if probe is not None
                             and not zoo.spec.is_vector else "sorted weight magnitudes")
    if n < 4 or threshold <= 0:
        return zoo, report
    sig = signatures(zoo, probe).double()
    loc, scale = robust_scale(zoo.tau)
    x = (zoo.tau.double() - loc) / scale
    gap = _nearest(x, torch.zeros(n, dtype=torch.bool), 1)[1][:, 0] / math.sqrt(x.shape[1])
    isolated = gap > threshold
    z = torch.zeros(n, dtype=torch.float64)
    if int((~isolated).sum()) < 4:  # too few left to judge functions by
        return _report(zoo, report, isolated, isolated, gap, z)
    params = x.shape[1] + 1  # of a local linear fit
    size = min(max(2 * k, 2 * params, math.ceil(2.5 * collusion * n)), MAX_REFERENCE)
    excluded, previous = isolated, None
    for _ in range(MAX_PASSES):  # each pass judges everyone against references without the last one's exclusions
        if previous is not None and torch.equal(excluded, previous):
            break
        previous, kept = excluded, int((~excluded).sum())
        ref, ref_dist = _nearest(x, excluded, min(max(size, k), kept - 1))
        radius = ref_dist[~excluded, min(k, kept - 1) - 1].median()
        weight = 1.0 / _crowd(x, excluded, radius)
        ref = ref[:, :min(size, kept - 1)]
        score = _scores(sig, x, ref, weight[ref], linear=ref.shape[1] >= 2 * params)
        judged = score[~isolated]
        med = judged.median()
        mad = (judged - med).abs().median().clamp_min(1e-8)
        z = (score - med) / (1.4826 * mad)
        excluded = isolated | (z > threshold)
    return _report(zoo, report, excluded, isolated, gap, z)


def _report(zoo: ModelZoo, report: ScreeningReport, excluded: Tensor, isolated: Tensor, gap: Tensor,
            z: Tensor) -> tuple[ModelZoo, ScreeningReport]:
    report.scores = {cid: float(v) for cid, v, far in zip(zoo.ids, z, isolated.tolist()) if not far}
    for i in torch.nonzero(excluded).flatten().tolist():
        report.excluded.append(zoo.ids[i])
        report.reasons[zoo.ids[i]] = (
            f"descriptor {float(gap[i]):.3g} robust scales per entry from every other one" if isolated[i] else
            f"function far from what its descriptor implies (robust z {float(z[i]):.1f})")
    return zoo.subset(torch.nonzero(~excluded).flatten()), report


def _distances(x: Tensor, excluded: Tensor) -> Iterator[Tensor]:
    """Blocks of rows of the pairwise distances (a large zoo's full matrix would not fit in
    memory); a model's distance to itself and to the ``excluded`` is infinite."""
    for start in range(0, x.shape[0], DISTANCE_ROWS):
        rows = torch.arange(start, min(start + DISTANCE_ROWS, x.shape[0]))
        d = torch.cdist(x[rows], x, compute_mode="donot_use_mm_for_euclid_dist")  # exact, even at 1e30
        d[:, excluded] = float("inf")
        d[torch.arange(len(rows)), rows] = float("inf")
        yield d


def _nearest(x: Tensor, excluded: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """Each model's ``count`` nearest others, never an ``excluded`` one: indices and distances."""
    found = [d.topk(count, largest=False) for d in _distances(x, excluded)]
    return torch.cat([f.indices for f in found]), torch.cat([f.values for f in found])


def _crowd(x: Tensor, excluded: Tensor, radius: Tensor) -> Tensor:
    """1 + the number of other models (not ``excluded``) within ``radius`` of each model."""
    return torch.cat([(d <= radius).sum(1) for d in _distances(x, excluded)]).double() + 1


def _scores(sig: Tensor, x: Tensor, ref: Tensor, w: Tensor, linear: bool) -> Tensor:
    """Each model's distance to the robust local prediction of its signature from its
    references ``ref`` (n, K) weighted ``w`` (n, K), in units of their own spread."""
    chunk = max(1, 2**22 // (ref.shape[1] * sig.shape[1]))  # bounds the (chunk, K, m) working set
    return torch.cat([_local_fit(sig[i:i + chunk], sig[ref[i:i + chunk]], x[i:i + chunk], x[ref[i:i + chunk]],
                                 w[i:i + chunk], linear) for i in range(0, sig.shape[0], chunk)])


def _local_fit(s: Tensor, s_ref: Tensor, x: Tensor, x_ref: Tensor, w: Tensor, linear: bool) -> Tensor:
    """Score of models with signatures ``s`` (c, m) at descriptors ``x`` (c, D) against their
    references ``s_ref`` (c, K, m) at ``x_ref`` (c, K, D) weighted ``w`` (c, K): start at the
    weighted median, then redescending weighted local linear fits."""
    c, size, _ = s_ref.shape
    centre = _weighted_median(s_ref, w)
    # the unit: how far the neighbours' functions sit from their median (their natural spread)
    spread = _weighted_median((s_ref - centre[:, None]).norm(dim=2)[..., None], w)[:, 0]
    fitted = centre[:, None].expand_as(s_ref)
    design = torch.cat([torch.ones(c, size, 1, dtype=x.dtype), x_ref - x[:, None]], dim=2)
    ridge = torch.diag(torch.tensor([0.0] + [RIDGE] * x.shape[1], dtype=x.dtype))
    for _ in range(IRLS_ROUNDS if linear else 0):
        resid = (s_ref - fitted).norm(dim=2)
        typical = _weighted_median(resid[..., None], w)[:, 0].clamp_min(1e-12)
        u = (resid / (TUKEY_CUT * typical[:, None])).clamp_max(1.0)
        robust = w * (1 - u**2) ** 2
        gram = design.transpose(1, 2) @ (robust[..., None] * design)
        gram = gram + robust.sum(1)[:, None, None] * ridge + 1e-12 * torch.eye(design.shape[2], dtype=x.dtype)
        coef = torch.linalg.solve(gram, design.transpose(1, 2) @ (robust[..., None] * s_ref))
        centre, fitted = coef[:, 0], design @ coef
    return (s - centre).norm(dim=1) / spread.clamp_min(1e-12)


def _weighted_median(values: Tensor, weights: Tensor) -> Tensor:
    """Per-coordinate weighted median over dim 1: ``values`` (c, K, m), ``weights`` (c, K)."""
    sorted_values, order = values.sort(dim=1)
    cum = weights[..., None].expand_as(values).gather(1, order).cumsum(1)
    below = (cum < 0.5 * cum[:, -1:]).sum(1, keepdim=True).clamp_max(values.shape[1] - 1)
    return sorted_values.gather(1, below)[:, 0]
