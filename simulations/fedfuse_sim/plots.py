"""Figures a person would rather look at than read."""

from __future__ import annotations

import math
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


def meta_steps_figure(path: Path, rows: list[dict[str, float | str]], shots: tuple[int, ...],
                      references: dict[str, dict[int, float]] | None = None) -> None:
    """nRMSE after shots against meta-steps, one panel per MAML architecture, both adaptations;
    ``references[method]``: a fixed figure per shot count drawn dotted in that method's panel
    (e.g. the paper's own MAML of that architecture)."""
    methods = list(dict.fromkeys(str(r["method"]) for r in rows))
    fig, axes = plt.subplots(1, len(methods), figsize=(4.5 * len(methods), 3.8), squeeze=False)
    for ax, method in zip(axes[0], methods):
        mine = [r for r in rows if r["method"] == method]
        steps = [r["meta_steps"] for r in mine]
        for j, k in enumerate(shots):
            colour = f"C{j}"
            ax.plot(steps, [r[f"own SGD {k}"] for r in mine], marker="o", color=colour, label=f"{k} shots, own SGD")
            ax.plot(steps, [r[f"adam {k}"] for r in mine], marker="x", ls="--", color=colour, label=f"{k} shots, Adam")
            if k in (references or {}).get(method, {}):
                ax.axhline(references[method][k], color=colour, ls=":", lw=1.2, label=f"{k} shots, paper")
        ax.set(title=method, xlabel="meta-steps", ylabel="nRMSE", yscale="log")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(shots), fontsize=7)
    fig.tight_layout(rect=(0, 0.2, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def accuracy_by_shots(path: Path, summary: dict[str, dict[str, tuple[float, float]]],
                      ks: tuple[int, ...], shots: tuple[int, ...],
                      paper: dict[str, dict[str, float]] | None = None) -> None:
    """One panel per K: mean accuracy (± std band) versus shots per digit for every method
    (ten colours, then the same colours dashed); the paper's "ours" as black crosses."""
    fig, axes = plt.subplots(1, len(ks), figsize=(3.6 * len(ks), 3.3), squeeze=False, sharey=True)
    palette = plt.get_cmap("tab10").colors
    for ax, K in zip(axes[0], ks):
        for i, (method, by_col) in enumerate(summary.items()):
            pts = [(k, *by_col[f"K={K} {k}-shot"]) for k in shots if f"K={K} {k}-shot" in by_col]
            if not pts:
                continue
            xs, mean, std = zip(*pts)
            line, = ax.plot(xs, mean, marker="o", lw=1.5, label=method, color=palette[i % len(palette)],
                            ls="-" if i < len(palette) else "--")
            ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=line.get_color(), alpha=0.12)
        ref = [(k, (paper or {}).get("ours", {}).get(f"K={K} {k}-shot")) for k in shots]
        ref = [(k, v) for k, v in ref if v is not None]
        if ref:
            ax.scatter(*zip(*ref), marker="x", color="black", zorder=5, label="paper: ours")
        ax.axhline(100 / K, color="gray", lw=0.8, ls=":")
        ax.set(title=f"K = {K}", xlabel="shots per digit", xticks=list(shots))
    axes[0][0].set_ylabel("K-way accuracy (%)")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def grouped_bars(path: Path, summary: dict[str, dict[str, tuple[float, float]]], columns: list[str],
                 ylabel: str, paper: dict[str, dict[str, float]] | None = None) -> None:
    """One group of bars per column (± std), one bar per method; the paper's value for the same
    method as a black tick on its bar."""
    methods = list(summary)
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(columns) * len(methods) / 3, 3.4))
    for j, method in enumerate(methods):
        xs = [c + (j - (len(methods) - 1) / 2) * width for c in range(len(columns))]
        vals = [summary[method].get(col, (float("nan"), 0.0)) for col in columns]
        ax.bar(xs, [v[0] for v in vals], width, yerr=[v[1] for v in vals], capsize=2, label=method)
        ref = (paper or {}).get(method, {})
        pts = [(x, ref[col]) for x, col in zip(xs, columns) if col in ref]
        if pts:
            ax.scatter(*zip(*pts), marker="_", s=200, color="black", zorder=5)
    ax.set_xticks(range(len(columns)), columns)
    ax.set_ylabel(ylabel)
    ax.set_title("bars: measured; black ticks: the paper", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def uncertainty_figure(path: Path, panels: dict[str, tuple[Tensor, Tensor, float]], error_label: str,
                       coverage: dict[str, float] | None = None) -> None:
    """Per-task 0-shot error against the posterior's ``uncertainty`` (one panel per group, with
    Spearman's rho); with ``coverage``, a reliability panel: the share of true function values
    inside the central band of posterior samples against the band's nominal level."""
    extra = coverage is not None
    fig, axes = plt.subplots(1, len(panels) + extra, figsize=(3.8 * (len(panels) + extra), 3.3), squeeze=False)
    for ax, (title, (unc, err, rho)) in zip(axes[0], panels.items()):
        ax.scatter(unc, err, s=10, alpha=0.6)
        ax.set(xlabel="uncertainty (expected error)", ylabel=error_label, title=f"{title}: Spearman {rho:.2f}")
    if extra:
        ax = axes[0][-1]
        levels = [float(k) for k in coverage]
        ax.plot([0, 1], [0, 1], color="gray", ls=":", label="calibrated")
        ax.plot(levels, list(coverage.values()), marker="o", label="posterior samples")
        ax.set(xlabel="nominal band level", ylabel="share of true values inside", title="band coverage",
               xlim=(0.4, 1.0), ylim=(0.4, 1.0))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# the groups a choices figure draws: line style, and whether their values are errors against uploads
# (lower is better) rather than the family's own score
CHOICE_GROUPS = {"the fit's simulated devices": (":", True), "new devices": ("-", False),
                 "held out of the fit": ("--", False), "held out, by uploads": ("-.", True)}


def gaps_from_best(values: list[float], higher_is_better: bool) -> list[float]:
    """Each value's distance from the best of them, in percent of the best; NaN where a value
    is not finite (a candidate that could not be scored)."""
    finite = [v for v in values if math.isfinite(v)]
    best = max(finite) if higher_is_better else min(finite)
    return [100 * abs(v - best) / abs(best) if math.isfinite(v) else math.nan for v in values]


def choices_figure(path: Path, curves: dict[str, dict[int, dict[str, dict[str, float]]]],
                   chosen: dict[str, dict[int, str]], higher_is_better: bool) -> None:
    """One panel per choice the fit makes (``curves[choice][seed][group][candidate]``: a mean
    value per candidate for each group of :data:`CHOICE_GROUPS`), every curve drawn as how far it
    is from its own best (percent, 0 at the best), one colour per seed, the fit's choice ringed on
    the new devices' curve: where the fit's simulated devices' curve bottoms out beside where the
    devices it serves want it."""
    fig, axes = plt.subplots(1, len(curves), figsize=(4.6 * len(curves), 3.6), squeeze=False)
    for ax, (choice, by_seed) in zip(axes[0], curves.items()):
        labels = list(next(iter(next(iter(by_seed.values())).values())))
        for s_idx, (seed, groups) in enumerate(by_seed.items()):
            for group, by in groups.items():
                style, is_error = CHOICE_GROUPS[group]
                gap = gaps_from_best([by[c] for c in labels], higher_is_better and not is_error)
                ax.plot(range(len(labels)), gap, ls=style, marker=".", color=f"C{s_idx}", label=f"seed {seed}, {group}")
                if group == "new devices":
                    at = labels.index(chosen[choice][seed])
                    ax.scatter([at], [gap[at]], s=90, facecolors="none", edgecolors=f"C{s_idx}", zorder=5)
        ax.set_xticks(range(len(labels)), labels, rotation=30)
        ax.set(title=f"{choice} (rings: the fit's choice)", xlabel="candidate", ylabel="% from the group's best",
               yscale="symlog", ylim=(0, None))
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=3, fontsize=7)
    fig.tight_layout(rect=(0, 0.25, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
