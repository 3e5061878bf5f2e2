"""Table 1 and Fig. 2 on one machine: pre-train a sine zoo, fuse it, personalize test tasks.

Methods: ``ours`` (the meta-model: decoded features, function-space readout; with shots the
device conditions the readout on them under the posterior, cross-validated on its own shots),
its ablations (``ours, Adam fine-tuning``: the same initializer tuned like every baseline;
``ours, 1-NN's features``: the readout on the nearest model's hidden layer instead of the
decoded one; ``paper's decoder``: the decoded initializer without the function-space readout;
``no-align``),
and baselines tuned with the same local Adam settings: ``cold-start``, ``1-NN`` (copy the
nearest descriptor's model), ``k-NN aligned`` (kernel-weighted average of aligned neighbours,
k and bandwidth by leave-one-out on the zoo), ``zoo average`` (one-shot FedAvg) and MAML at
[1-100-1] and [1-40-40-1] (centralized, synchronized meta-training on the training tasks).
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fedfuse.alignment import apply_perms
from fedfuse.adaptation import condition_readout
from fedfuse.training import train_networks
from fedfuse.architectures import MLPSpec
from fedfuse.meta_model import MetaModel
from fedfuse.posterior import WeightPosterior
from fedfuse.progress import progress_bar
from fedfuse.tasks import sine
from fedfuse.zoo import ModelZoo
from fedfuse_sim import baselines, calibration, plots, report

SHOTS = (0, 10, 20, 30, 40)
PAPER = {  # Table 1 of the paper, nRMSE at 0/10/20/30/40 shots
    "ours": [0.135, 0.114, 0.029, 0.021, 0.017],
    "no-align": [0.357, 0.125, 0.043, 0.036, 0.028],
    "cold-start": [0.445, 0.149, 0.085, 0.076, 0.052],
    "MAML [1-100-1]": [0.446, 0.281, 0.161, 0.149, 0.142],
    "MAML [1-40-40-1]": [0.258, 0.022, 0.014, 0.014, 0.012],
}
MAML_SPECS = {"MAML [1-100-1]": sine.SPEC, "MAML [1-40-40-1]": MLPSpec((1, 40, 40, 1))}


@dataclass
class SineConfig:
    n_train: int = 200
    n_test: int = 100
    shots: tuple[int, ...] = SHOTS
    seeds: tuple[int, ...] = (0, 1, 2)
    pretrain_points: int = 200
    pretrain_steps: int = 1000
    finetune_steps: int = 500
    finetune_lr: float = 1e-2
    probe_points: int = 64
    maml_steps: int = 20000  # Finn et al. use 70,000; --maml-steps 70000 measures the difference
    maml_tasks: int = 25
    maml_shots: int = 10
    maml_test_steps: int = 10
    plot_tasks: int = 3
    posterior_samples: int = 200
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def smoke(cls, seeds: tuple[int, ...] = (0,)) -> "SineConfig":
        """A reduced size for CI (same code path, minutes less)."""
        return cls(n_train=40, n_test=10, shots=(0, 10), seeds=seeds, pretrain_steps=300,
                   finetune_steps=100, maml_steps=100, maml_tasks=8, posterior_samples=50,
                   meta={"max_rounds": 3, "steps_per_round": 60, "hidden": (64,)})


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fit_meta(zoo: ModelZoo, cfg: SineConfig, seed: int, align: bool, progress: bool) -> MetaModel:
    probe = sine.probe_grid(cfg.probe_points)
    model = MetaModel(align=align, seed=seed, progress=progress, **cfg.meta)
    return model.fit(zoo, probe=probe)


def pretrain_zoo(cfg: SineConfig, seed: int) -> tuple[sine.SineTasks, ModelZoo]:
    train = sine.sample_tasks(cfg.n_train, seed)
    weights = sine.pretrain(train, seed + 1, cfg.pretrain_points, cfg.pretrain_steps)
    zoo = ModelZoo(sine.SPEC, weights, train.tau, [f"sine-{i:05d}" for i in range(cfg.n_train)],
                   [cfg.pretrain_points] * cfg.n_train)
    return train, zoo


def fit_maml(spec: MLPSpec, train: sine.SineTasks, cfg: SineConfig, seed: int,
             progress: bool, checkpoints: tuple[int, ...] = ()) -> baselines.MAML:
    """Finn et al.'s sine recipe: 10-shot support and query, one inner SGD step (lr 0.01)."""
    def episodes(step: int) -> baselines.Episode:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        tasks = train.subset(torch.randint(len(train), (cfg.maml_tasks,), generator=gen))
        lo, hi = sine.X_RANGE
        xs, xq = (lo + (hi - lo) * torch.rand(2, cfg.maml_tasks, cfg.maml_shots, 1, generator=gen))
        return xs, tasks(xs), xq, tasks(xq)

    return baselines.MAML(spec, meta_steps=cfg.maml_steps, seed=seed, progress=progress).fit(episodes, checkpoints)


def unseen_tasks(n: int, seed: int) -> sine.SineTasks:
    """A seed's unseen test tasks (a stream disjoint from the zoo's)."""
    return sine.sample_tasks(n, seed + sine.TEST_SEED_OFFSET)


def shot_inputs(n_tasks: int, k: int, seed: int) -> Tensor:
    """A seed's ``k``-shot inputs, the same for every method (and for reports on saved fits)."""
    return sine.sample_x(n_tasks, k, seed + 1000 + k)


# a method's local adaptation: k-shot inputs and targets -> fine-tuned weights
Tuner = tuple[MLPSpec, Callable[[Tensor, Tensor], Tensor]]


def evaluate(tuners: dict[str, Tuner], test: sine.SineTasks, cfg: SineConfig, seed: int,
             progress: bool) -> tuple[list[dict[str, Any]], dict[tuple[str, int], Tensor]]:
    """Adapt every method on the same k shots; score nRMSE per task."""
    rows, tuned = [], {}
    with progress_bar(progress, "fine-tuning", total=len(tuners) * len(cfg.shots)) as bar:
        for k in cfg.shots:
            x = shot_inputs(len(test), k, seed)
            for method, (spec, tune) in tuners.items():
                w = tune(x, test(x))
                tuned[(method, k)] = w
                for i, score in enumerate(sine.nrmse(spec, w, test).tolist()):
                    rows.append({"seed": seed, "method": method, "shots": k, "task": i,
                                 "domain": int(test.domain[i]), "a": float(test.a[i]),
                                 "b": float(test.b[i]), "nrmse": score})
                bar.update(description=f"fine-tuning {method}, {k} shots")
    return rows, tuned


def bayes_tuner(post: WeightPosterior) -> Callable[[Tensor, Tensor], Tensor]:
    """Ours with shots: condition the readout on them under the posterior (a device's own
    cross-validation picks how far, by the rule of the path that made ``post``); 0 or 1 shot
    keeps the initializer."""
    return lambda x, y: condition_readout(sine.SPEC, post.mean, post.readout, x, y, "mse",
                                          distilled=post.distilled)


def posterior_stats(post: WeightPosterior, test: sine.SineTasks, samples: int, seed: int) -> dict[str, Any]:
    """Spearman(uncertainty, 0-shot error) and the coverage of central bands of the posterior's
    function samples on the evaluation grid."""
    x = sine.eval_grid()
    draws = post.sample((samples,), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        f = torch.stack([sine.SPEC.forward(d, x)[..., 0] for d in draws])
    err = sine.nrmse(sine.SPEC, post.mean, test)
    return {"spearman": calibration.rank_correlation(post.uncertainty, err),
            "coverage": calibration.coverage_curve(f, test(x)[..., 0]),
            "uncertainty": post.uncertainty.tolist(), "error": err.tolist()}


def reconstruction(model: MetaModel, zoo: ModelZoo, train: sine.SineTasks) -> dict[str, float]:
    """How well the meta-model holds the zoo itself: the uploaded nets' own nRMSE, the decoded
    training nets', and theirs with the readout solved for their own function on the probe."""
    return {"uploaded": float(sine.nrmse(sine.SPEC, zoo.weights, train).mean()),
            "decoded": float(sine.nrmse(sine.SPEC, model.reconstruct(), train).mean()),
            "decoded + own readout": float(sine.nrmse(sine.SPEC, model.reconstruct(own_readout=True), train).mean())}


def run_seed(out: Path, cfg: SineConfig, seed: int, progress: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One seed: a fresh zoo, fits, baselines and scores; the first seed also draws Fig. 2."""
    torch.manual_seed(seed)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    train, zoo = pretrain_zoo(cfg, seed)
    timings["pretrain_s"] = time.perf_counter() - t0

    rss_before = peak_rss_mb()
    t0 = time.perf_counter()
    ours = fit_meta(zoo, cfg, seed, align=True, progress=progress)
    timings["fit_s"] = time.perf_counter() - t0
    fit_peak = peak_rss_mb()
    t0 = time.perf_counter()
    no_align = fit_meta(zoo, cfg, seed, align=False, progress=progress)
    timings["fit_no_align_s"] = time.perf_counter() - t0
    ours.save(out / f"meta_model_seed{seed}.safetensors")
    mamls = {}
    for name, spec in MAML_SPECS.items():
        t0 = time.perf_counter()
        mamls[name] = fit_maml(spec, train, cfg, seed, progress)
        timings[f"{name} s"] = time.perf_counter() - t0

    test = unseen_tasks(cfg.n_test, seed)
    gen = torch.Generator().manual_seed(seed + 31)
    t0 = time.perf_counter()
    post = ours.personalize(test.tau)
    timings["personalize_all_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours.personalize(test.tau[:1])
    timings["one_initializer_ms"] = 1000 * (time.perf_counter() - t0)
    post_no_align = no_align.personalize(test.tau)
    t0 = time.perf_counter()
    post_distilled = ours.personalize(test.tau, distill=True)
    timings["personalize_all_distilled_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours.personalize(test.tau[:1], distill=True)
    timings["one_distilled_initializer_ms"] = 1000 * (time.perf_counter() - t0)
    post_no_align_distilled = no_align.personalize(test.tau, distill=True)
    probe = sine.probe_grid(cfg.probe_points)
    neighbours = baselines.AlignedNeighbours().fit(sine.SPEC, apply_perms(sine.SPEC, zoo.weights, ours.perms_),
                                                   zoo.tau, probe)
    n = len(test)
    nearest = baselines.nearest_neighbour(zoo.tau, zoo.weights, test.tau)
    post_nn = ours.personalize(test.tau, features=nearest)
    inits = {
        "ours": (sine.SPEC, post.mean),
        "ours, distilled": (sine.SPEC, post_distilled.mean),
        "ours, Adam fine-tuning": (sine.SPEC, post.mean),
        "ours, 1-NN's features": (sine.SPEC, post_nn.mean),
        "paper's decoder": (sine.SPEC, ours.decode(test.tau)),
        "no-align": (sine.SPEC, post_no_align.mean),
        "no-align, distilled": (sine.SPEC, post_no_align_distilled.mean),
        "cold-start": (sine.SPEC, sine.SPEC.init(n, gen)),
        "1-NN": (sine.SPEC, nearest),
        "k-NN aligned": (sine.SPEC, neighbours.predict(test.tau)),
        "zoo average": (sine.SPEC, baselines.zoo_average(zoo.weights, n)),
    } | {name: (MAML_SPECS[name], m.init(n)) for name, m in mamls.items()}
    tuners = {m: (spec, partial(train_networks, spec, init, steps=cfg.finetune_steps, lr=cfg.finetune_lr))
              for m, (spec, init) in inits.items()}
    for method, p in (("ours", post), ("ours, distilled", post_distilled), ("ours, 1-NN's features", post_nn),
                      ("no-align", post_no_align), ("no-align, distilled", post_no_align_distilled)):
        tuners[method] = (sine.SPEC, bayes_tuner(p))
    tuners |= {f"{name}, own SGD": (MAML_SPECS[name], partial(m.train_networks, steps=cfg.maml_test_steps))
               for name, m in mamls.items()}  # MAML as Finn et al. test it: its own SGD steps
    rows, tuned = evaluate(tuners, test, cfg, seed, progress)
    stats = posterior_stats(post, test, cfg.posterior_samples, seed)
    if seed == cfg.seeds[0]:
        draw_figures(out, cfg, seed, test, inits, tuned, {"ours": ours.history_, "no-align": no_align.history_})
        plots.uncertainty_figure(out / "uncertainty.png",
                                 {"sine, ours": (torch.tensor(stats["uncertainty"]), torch.tensor(stats["error"]),
                                                 stats["spearman"])}, "0-shot nRMSE", stats["coverage"])
    extra = {"timings": timings,
             "peak_rss_mb": {"before_fit": rss_before, "after_fit": fit_peak, "end": peak_rss_mb()},
             "fit_rounds": {"ours": ours.n_rounds_, "no-align": no_align.n_rounds_},
             "model_file_mb": (out / f"meta_model_seed{seed}.safetensors").stat().st_size / 2**20,
             "uncertainty": {"spearman": stats["spearman"], "coverage": stats["coverage"]},
             "reconstruction_nrmse": reconstruction(ours, zoo, train),
             "worse_than_0shot": report.worse_than_zero_shot(rows, "ours", "nrmse", lower_is_better=True),
             "worse_than_0shot_distilled": report.worse_than_zero_shot(rows, "ours, distilled", "nrmse",
                                                                       lower_is_better=True),
             "selected": {"kernel": ours.function_.kernel_name_, "kernel_loo": ours.function_.candidates_,
                          "readout_ridge": ours.readout_ridge_, "readout_errors": ours.readout_errors_,
                          "distill_steps": ours.distill_steps_, "distill_errors": ours.distill_errors_,
                          "nearby_covariance": [ours.function_.nearby_size_, ours.function_.nearby_shrink_],
                          "k-NN": {"k": neighbours.k_, "bandwidth": neighbours.h_}}}
    return rows, extra


def draw_figures(out: Path, cfg: SineConfig, seed: int, test: sine.SineTasks,
                 inits: dict[str, tuple[MLPSpec, Tensor]], tuned: dict[tuple[str, int], Tensor],
                 histories: dict[str, list[dict[str, float]]]) -> None:
    sel = list(range(min(cfg.plot_tasks, len(test))))
    x = sine.eval_grid()
    k_plot = next((k for k in cfg.shots if k > 0), 0)
    curves = {}
    with torch.no_grad():
        for method in ("ours", "MAML [1-100-1]", "1-NN"):
            spec, init = inits[method]
            curves[f"{method} 0-shot"] = spec.forward(init[sel], x)[..., 0]
        if k_plot:
            for method in ("ours", "MAML [1-100-1]"):
                spec = inits[method][0]
                curves[f"{method} {k_plot}-shot"] = spec.forward(tuned[(method, k_plot)][sel], x)[..., 0]
    xs = shot_inputs(len(test), k_plot, seed)[sel]
    plots.sine_figure(out / "sine_fig2.png", x[:, 0], test.subset(sel)(x)[..., 0], curves,
                      xs[..., 0], test.subset(sel)(xs)[..., 0],
                      [f"a={test.a[i]:.2f}, b={test.b[i]:.2f}" for i in sel])
    plots.fit_history_figure(out / "fit_history.png", histories)


def run(out: Path, cfg: SineConfig, progress: bool = True) -> dict[str, Any]:
    """Every seed; writes ``results.csv``, ``summary.json``, ``table.md``, ``sine_fig2.png``,
    ``fit_history.png`` and each seed's fitted ``meta_model_seed{s}.safetensors``."""
    out.mkdir(parents=True, exist_ok=True)
    rows, per_seed = report.over_seeds(cfg.seeds, lambda seed: run_seed(out, cfg, seed, progress))
    columns = [f"{k}-shot" for k in cfg.shots]
    paper = {m: {f"{k}-shot": v for k, v in zip(SHOTS, vals)} for m, vals in PAPER.items()}
    title = (f"Sine nRMSE, mean ± std over {cfg.n_test} test tasks × {len(cfg.seeds)} seeds "
             f"({cfg.n_train}-model zoo)")
    return report.finish(out, rows, "nrmse", columns, paper, title,
                         {"config": asdict(cfg), "per_seed": per_seed, "notes": [baselines.MAML_NOTE]},
                         progress=progress)
