"""Table 1 and Fig. 2 on one machine: pre-train a sine zoo, fuse it, personalize test tasks.

Methods, all with the same [1-100-1] net and the same local fine-tuning:
``ours`` (aligned meta-model), ``no-align`` (the ablation: identity alignment) and
``cold-start`` (a fresh random init).
"""

from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedfuse.finetune import finetune
from fedfuse.meta_model import MetaModel
from fedfuse.progress import progress_bar
from fedfuse.tasks import sine
from fedfuse.zoo import ModelZoo
from fedfuse_sim import plots, report

PAPER = {  # Table 1 of the paper, nRMSE at 0/10/20/30/40 shots
    "ours": [0.135, 0.114, 0.029, 0.021, 0.017],
    "no-align": [0.357, 0.125, 0.043, 0.036, 0.028],
    "cold-start": [0.445, 0.149, 0.085, 0.076, 0.052],
}


@dataclass
class SineConfig:
    n_train: int = 200
    n_test: int = 100
    shots: tuple[int, ...] = (0, 10, 20, 30, 40)
    seed: int = 0
    pretrain_points: int = 200
    pretrain_steps: int = 1000
    finetune_steps: int = 500
    finetune_lr: float = 1e-2
    probe_points: int = 64
    plot_tasks: int = 3
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def quick(cls, seed: int = 0) -> "SineConfig":
        """A reduced size for CI and smoke runs (same code path, minutes less)."""
        return cls(n_train=40, n_test=10, shots=(0, 10), seed=seed, pretrain_steps=300,
                   finetune_steps=100, meta={"max_rounds": 3, "steps_per_round": 60,
                                            "hidden": (64,)})


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fit_meta(zoo: ModelZoo, cfg: SineConfig, align: bool, progress: bool) -> MetaModel:
    probe = torch.linspace(*sine.X_RANGE, cfg.probe_points)[:, None]
    model = MetaModel(align=align, seed=cfg.seed, progress=progress, **cfg.meta)
    return model.fit(zoo, probe=probe)


def pretrain_zoo(cfg: SineConfig) -> tuple[sine.SineTasks, ModelZoo]:
    train = sine.sample_tasks(cfg.n_train, cfg.seed)
    weights = sine.pretrain(train, cfg.seed + 1, cfg.pretrain_points, cfg.pretrain_steps)
    zoo = ModelZoo(sine.SPEC, weights, train.tau, [f"sine-{i:05d}" for i in range(cfg.n_train)],
                   [cfg.pretrain_points] * cfg.n_train)
    return train, zoo


def evaluate(inits: dict[str, torch.Tensor], test: sine.SineTasks, cfg: SineConfig,
             progress: bool) -> tuple[list[dict[str, Any]], dict[tuple[str, int], torch.Tensor]]:
    """Fine-tune every method's initializers on the same k shots; score nRMSE per task."""
    rows, tuned = [], {}
    with progress_bar(progress, "fine-tuning", total=len(inits) * len(cfg.shots)) as bar:
        for k in cfg.shots:
            x = sine.sample_x(len(test), k, cfg.seed + 1000 + k)
            for method, init in inits.items():
                w = finetune(sine.SPEC, init, x, test(x), cfg.finetune_steps, cfg.finetune_lr)
                tuned[(method, k)] = w
                for i, score in enumerate(sine.nrmse(sine.SPEC, w, test).tolist()):
                    rows.append({"method": method, "shots": k, "task": i, "domain": int(test.domain[i]),
                                 "a": float(test.a[i]), "b": float(test.b[i]), "nrmse": score})
                bar.update(description=f"fine-tuning {method}, {k} shots")
    return rows, tuned


def run(out: Path, cfg: SineConfig, progress: bool = True) -> dict[str, Any]:
    """The whole benchmark; writes ``results.csv``, ``summary.json``, ``table.md``,
    ``sine_fig2.png``, ``fit_history.png`` and the fitted ``meta_model.safetensors``."""
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    train, zoo = pretrain_zoo(cfg)
    timings["pretrain_s"] = time.perf_counter() - t0
    zoo.save(out / "zoo.safetensors")

    rss_before = peak_rss_mb()
    t0 = time.perf_counter()
    ours = fit_meta(zoo, cfg, align=True, progress=progress)
    timings["fit_s"] = time.perf_counter() - t0
    fit_peak = peak_rss_mb()
    t0 = time.perf_counter()
    no_align = fit_meta(zoo, cfg, align=False, progress=progress)
    timings["fit_no_align_s"] = time.perf_counter() - t0
    ours.save(out / "meta_model.safetensors")

    test = sine.sample_tasks(cfg.n_test, cfg.seed + 7919)
    gen = torch.Generator().manual_seed(cfg.seed + 31)
    t0 = time.perf_counter()
    post = ours.personalize(test.tau)
    timings["personalize_all_s"] = time.perf_counter() - t0
    inits = {
        "ours": post.mean,
        "no-align": no_align.personalize(test.tau).mean,
        "cold-start": sine.SPEC.init(len(test), gen),
    }
    rows, tuned = evaluate(inits, test, cfg, progress)
    summary = report.summarize(rows, "nrmse")
    shots = list(cfg.shots)

    report.write_rows(out / "results.csv", rows)
    table = report.markdown_table(summary, shots, {m: v for m, v in PAPER.items()} if
                                  shots == [0, 10, 20, 30, 40] else None)
    (out / "table.md").write_text(table + "\n")
    result = {
        "config": asdict(cfg),
        "summary": {m: {str(k): v for k, v in s.items()} for m, s in summary.items()},
        "paper": PAPER,
        "timings": timings,
        "peak_rss_mb": {"before_fit": rss_before, "after_fit": fit_peak, "end": peak_rss_mb()},
        "fit_rounds": {"ours": ours.n_rounds_, "no-align": no_align.n_rounds_},
        "model_file_mb": (out / "meta_model.safetensors").stat().st_size / 2**20,
    }
    report.write_json(out / "summary.json", result)

    sel = list(range(min(cfg.plot_tasks, len(test))))
    x = sine.eval_grid()
    k_plot = next((k for k in shots if k > 0), 0)
    curves = {}
    with torch.no_grad():
        for method in ("ours", "no-align", "cold-start"):
            curves[f"{method} 0-shot"] = sine.SPEC.forward(inits[method][sel], x)[..., 0]
        if k_plot:
            curves[f"ours {k_plot}-shot"] = sine.SPEC.forward(tuned[("ours", k_plot)][sel], x)[..., 0]
    xs = sine.sample_x(len(test), k_plot, cfg.seed + 1000 + k_plot)[sel]
    plots.sine_figure(out / "sine_fig2.png", x[:, 0], test.subset(sel)(x)[..., 0], curves,
                      xs[..., 0], test.subset(sel)(xs)[..., 0],
                      [f"a={test.a[i]:.2f}, b={test.b[i]:.2f}" for i in sel])
    plots.fit_history_figure(out / "fit_history.png",
                             {"ours": ours.history_, "no-align": no_align.history_})
    if progress:
        report.print_table(summary, shots, "sine nRMSE (mean ± std over test tasks)")
    return result
