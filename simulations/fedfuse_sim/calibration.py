"""Does the uncertainty mean something? Rank correlation with the error, and band coverage."""

from __future__ import annotations

import torch
from scipy.stats import spearmanr
from torch import Tensor

LEVELS = (0.5, 0.8, 0.9, 0.95)


def rank_correlation(uncertainty: Tensor, error: Tensor) -> float:
    """Spearman's rho between a per-task uncertainty and the per-task error (1: perfect order)."""
    return float(spearmanr(uncertainty.double().numpy(), error.double().numpy())[0])


def band_coverage(samples: Tensor, truth: Tensor, level: float = 0.9) -> float:
    """Share of true values inside the central ``level`` band of the samples at the same point:
    ``samples`` ``(S, ...)``, ``truth`` ``(...)``. Calibrated samples cover ``level``."""
    lo = torch.quantile(samples, (1 - level) / 2, dim=0)
    hi = torch.quantile(samples, (1 + level) / 2, dim=0)
    return float(((truth >= lo) & (truth <= hi)).float().mean())


def coverage_curve(samples: Tensor, truth: Tensor, levels: tuple[float, ...] = LEVELS) -> dict[str, float]:
    return {f"{level:.2f}": band_coverage(samples, truth, level) for level in levels}
