"""Figures a person would rather look at than read."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from torch import Tensor  # noqa: E402


def sine_figure(path: Path, x: Tensor, truth: Tensor, curves: dict[str, Tensor],
                shots_x: Tensor, shots_y: Tensor, titles: list[str]) -> None:
    """Fig. 2 analogue: for a few test tasks, the true function, each method's curve (0-shot
    and fine-tuned) and the shots used for fine-tuning. ``truth``/curves: ``(q, N)``."""
    q = truth.shape[0]
    fig, axes = plt.subplots(1, q, figsize=(4.2 * q, 3.4), squeeze=False)
    for j, ax in enumerate(axes[0]):
        ax.plot(x, truth[j], color="black", lw=2.5, label="true function")
        for label, y in curves.items():
            ax.plot(x, y[j], lw=1.6, ls="--" if "0-shot" in label else "-", label=label)
        ax.scatter(shots_x[j], shots_y[j], color="black", s=18, zorder=5, label="fine-tuning shots")
        ax.set_title(titles[j], fontsize=10)
        ax.set_xlabel("x")
    axes[0][0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def fit_history_figure(path: Path, histories: dict[str, list[dict[str, float]]]) -> None:
    """ELBO and the fraction of re-aligned models per round of the alternating fit."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.2))
    for label, hist in histories.items():
        rounds = [h["round"] for h in hist]
        a1.plot(rounds, [h["elbo"] for h in hist], marker="o", label=label)
        a2.plot(rounds, [h["changed"] for h in hist], marker="o", label=label)
    a1.set(xlabel="round", ylabel="ELBO")
    a2.set(xlabel="round", ylabel="fraction of models re-aligned")
    a1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)



