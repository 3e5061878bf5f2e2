"""Outlier screening: models far from their task neighbours are excluded before the fit.

Each model gets a permutation-invariant signature: its outputs on the server's probe inputs
when there are any (the function itself), else the sorted magnitudes of each weight tensor.
Its score is the distance of that signature to the median signature of its ``k`` nearest
training tasks by descriptor, in units of the neighbours' own distances to that median (a local
scale, so regions of small or large outputs are judged alike); a robust z-score over the zoo
(median and MAD) above ``threshold`` excludes it. A scaled or random model claiming a task
differs from every honest model of similar tasks, while honest models differ little.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedfuse.zoo import ModelZoo


@dataclass
class ScreeningReport:
    excluded: list[str] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)  # robust z-score per model
    threshold: float = 0.0
    signature: str = ""

    def as_dict(self) -> dict:
        return {"excluded": self.excluded, "threshold": self.threshold, "signature": self.signature,
                "max_score": max(self.scores.values(), default=0.0)}


def signatures(zoo: ModelZoo, probe: Tensor | None) -> Tensor:
    if probe is not None and not zoo.spec.is_vector:
        with torch.no_grad():
            return zoo.spec.forward(zoo.weights, probe.float()).flatten(1)
    parts = [p.flatten(1).abs().sort(dim=1).values for p in zoo.spec.unflatten(zoo.weights).values()]
    return torch.cat(parts, dim=1)


def screen(zoo: ModelZoo, probe: Tensor | None = None, k: int = 8,
           threshold: float = 10.0) -> tuple[ModelZoo, ScreeningReport]:
    """The zoo without its outliers, and a report of what was excluded and why."""
    n = len(zoo)
    report = ScreeningReport(threshold=threshold, signature="probe outputs" if probe is not None
                             and not zoo.spec.is_vector else "sorted weight magnitudes")
    if n < 4 or threshold <= 0:
        return zoo, report
    sig = signatures(zoo, probe)
    tau = zoo.tau
    tau = (tau - tau.mean(0)) / tau.std(0, unbiased=False).clamp_min(1e-8)
    dist = torch.cdist(tau, tau)
    dist.fill_diagonal_(float("inf"))
    nbrs = dist.topk(min(k, n - 1), largest=False).indices  # (n, k)
    centre = sig[nbrs].median(dim=1).values
    # how far a model sits from its neighbours' centre, in units of how far they sit from it
    spread = (sig[nbrs] - centre[:, None]).norm(dim=2).median(dim=1).values
    score = (sig - centre).norm(dim=1) / spread.clamp_min(1e-8)
    med = score.median()
    mad = (score - med).abs().median().clamp_min(1e-8)
    z = (score - med) / (1.4826 * mad)
    keep = z <= threshold
    report.scores = {cid: float(v) for cid, v in zip(zoo.ids, z)}
    report.excluded = [cid for cid, kept in zip(zoo.ids, keep.tolist()) if not kept]
    return zoo.subset(torch.nonzero(keep).flatten()), report
