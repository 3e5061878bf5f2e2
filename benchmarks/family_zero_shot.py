"""Ours at 0 shots against every method on the same uploads, on any task family.

    python benchmarks/family_zero_shot.py --family bump_family.steps:StepFamily --out runs/bench/family [--seeds 0 1 2]

The three benchmarks score goal 1 of the quality work (ours at least as good as every method
that sees the same uploads) on their own tasks; this scores it on a family no table was tuned
on. Per seed: a fresh zoo of ``--devices`` simulated devices (each net trained by the family's
recipe, as `rule_transfer.py` builds it), our meta-model fitted with and without alignment, and
``--n-test`` new devices scored by the family's own score at 0 shots: ours (fast and distilled),
no-align (both), 1-NN, k-NN aligned and the zoo average; and the new devices' mean score at each candidate readout ridge beside the
one the fit chose on its simulated devices, and the same for distillation's step count. With ``--held-out H``, H more zoo devices are trained
alike but left out of the fit, and scored at every candidate ridge and step count too, against their own task and
against their uploads on the probe (what a server could compute): whether the fit's simulated
devices, held out of the two GPs but not of the decoder, want the ridge that devices held out of
the whole fit want. Nothing here is a setting.
Writes family_zero_shot.json, family_zero_shot.md and choices.png (each choice's candidates as
the fit's simulated devices and the devices it serves score them, the fit's choice ringed).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from fedfuse.alignment import apply_perms
from fedfuse.fitter import DISTILL_STEPS, READOUT_RIDGES, _upload_error
from fedfuse.meta_model import MetaModel
from fedfuse.tasks import DeviceConfig, TaskFamily, get_family
from fedfuse.zoo import ModelZoo
from fedfuse_sim import baselines, plots
from rule_transfer import zoo_of


def seed_scores(family: TaskFamily, devices: int, n_test: int, seed: int, held_out: int = 0
                ) -> tuple[dict[str, list[float]], dict]:
    """Every method's score per new device of one fresh zoo, and what each fit chose (the
    readout's ridge, distillation's steps and their scores) and how long it took; with
    ``held_out``, the fits leave the zoo's last ``held_out`` devices out and they are scored at
    every candidate ridge and step count."""
    every = zoo_of(family, devices + held_out, seed)
    zoo = every.subset(range(devices))
    probe = family.probe(seed)
    cfg = DeviceConfig(num_clients=devices, num_new=n_test, seed=seed, shots=0)
    new = [family.simulated_device(devices + j, cfg) for j in range(n_test)]
    tau = torch.tensor([d.tau for d in new])

    def score(w: Tensor) -> list[float]:
        return [float(family.evaluate(w[j : j + 1], d)[0]) for j, d in enumerate(new)]

    scores, seconds, models = {}, {}, {}
    for name, align in (("ours", True), ("no-align", False)):
        t0 = time.perf_counter()
        models[name] = MetaModel(seed=seed, progress=False, align=align, **family.meta_model_settings()).fit(zoo, probe=probe)
        seconds[name] = time.perf_counter() - t0
        scores[name] = score(models[name].personalize(tau).mean)
        scores[f"{name}, distilled"] = score(models[name].personalize(tau, distill=True).mean)
    aligned = apply_perms(zoo.spec, zoo.weights, models["ours"].perms_)
    scores["k-NN aligned"] = score(baselines.AlignedNeighbours().fit(zoo.spec, aligned, zoo.tau, probe).predict(tau))
    scores["1-NN"] = score(baselines.nearest_neighbour(zoo.tau, zoo.weights, tau))
    scores["zoo average"] = score(baselines.zoo_average(zoo.weights, n_test))
    print(f"seed {seed}: fits {seconds['ours']:.0f} s (ours), {seconds['no-align']:.0f} s (no-align)", flush=True)
    fits = {name: {"seconds": seconds[name], "readout_ridge": m.readout_ridge_,
                   "readout_errors": {str(r): e for r, e in m.readout_errors_.items()}} for name, m in models.items()}
    fits["ours"]["distill_steps"] = models["ours"].distill_steps_
    fits["ours"]["distill_errors"] = {str(k): e for k, e in models["ours"].distill_errors_.items()}
    for suffix in CHOICES:
        fits["ours"][f"new_devices_by_{suffix}"] = candidate_scores(models["ours"], suffix, tau, {"new": score})["new"]
    if held_out:
        fits["ours"].update(held_out_scores(family, models["ours"], every, devices, seed))
    return scores, fits


# each choice the fit makes: the fitted attribute, its candidates, and whether it acts on the distilled path
CHOICES = {"ridge": ("readout_ridge_", READOUT_RIDGES, False), "steps": ("distill_steps_", DISTILL_STEPS, True)}
# per choice: its name in the report's fits (chosen value, the simulated devices' errors) and in a figure
REPORTED = {"ridge": ("readout_ridge", "readout_errors", "the readout's ridge"),
            "steps": ("distill_steps", "distill_errors", "distillation's step count")}


def candidate_scores(model: MetaModel, choice: str, tau: Tensor,
                     scorers: dict[str, Callable[[Tensor], list[float]]]) -> dict[str, dict[str, float]]:
    """Devices' mean score under each of ``scorers`` of their 0-shot networks at each candidate of
    ``choice`` (a key of ``CHOICES``), one initializer per candidate: whether what the fit chose
    on its simulated devices is what these devices would want (a check, not a choice: the model
    keeps its own)."""
    attr, candidates, distill = CHOICES[choice]
    chosen, out = getattr(model, attr), {name: {} for name in scorers}
    try:
        for candidate in candidates:
            setattr(model, attr, candidate)
            weights = model.personalize(tau, distill=distill).mean
            for name, score in scorers.items():
                values = score(weights)
                out[name][str(candidate)] = sum(values) / len(values)
    finally:
        setattr(model, attr, chosen)
    return out


def held_out_scores(family: TaskFamily, model: MetaModel, every: ModelZoo, devices: int, seed: int
                    ) -> dict[str, dict[str, float]]:
    """The zoo devices left out of the fit (``every``'s after the first ``devices``) at every
    candidate ridge and step count: their mean score against their own task, and their networks' error against
    their uploads on the probe (the fitter's ``_upload_error``: what a server holding those
    uploads could judge by)."""
    cfg = DeviceConfig(num_clients=len(every), num_new=0, seed=seed, shots=0)
    data = [family.simulated_device(i, cfg) for i in range(devices, len(every))]
    tau, probe = every.tau[devices:], model.probe_
    own = family.arch.forward(every.weights[devices:], probe).double()

    def task(w: Tensor) -> list[float]:
        return [float(family.evaluate(w[j : j + 1], d)[0]) for j, d in enumerate(data)]

    def upload(w: Tensor) -> list[float]:
        return [_upload_error(model, family.arch.forward(w, probe).double(), own)]

    return {f"{name}_by_{choice}": by for choice in CHOICES
            for name, by in candidate_scores(model, choice, tau, {"held_out": task, "held_out_uploads": upload}).items()}


def choice_lines(family: TaskFamily, fits: dict[int, dict]) -> list[str]:
    """Per seed and choice (the readout's ridge, distillation's steps): what the fit chose and
    what its new devices score best at (and, where devices were held out of the fit, what they
    score best at, by their task and by their uploads)."""
    best = max if family.score.higher_is_better else min
    held = "held_out_by_ridge" in next(iter(fits.values()))["ours"]
    lines = []
    for title, chosen, suffix, candidates in (("The readout's ridge (fast path", "readout_ridge", "ridge", READOUT_RIDGES),
                                              ("Distillation's step count (distilled path", "distill_steps", "steps", DISTILL_STEPS)):
        rows = [("new devices", f"new_devices_by_{suffix}", best)]
        if held:
            rows += [("held out of the fit", f"held_out_by_{suffix}", best),
                     ("held out, by uploads", f"held_out_uploads_by_{suffix}", min)]
        lines += ["", f"{title}; devices' mean {family.score.name} at each candidate; by uploads: relative error "
                  "against them on the probe):", "",
                  "| seed | devices | chosen | their best | " + " | ".join(str(c) for c in candidates) + " |",
                  "|---" * (len(candidates) + 4) + "|"]
        for seed, f in fits.items():
            for name, key, pick in rows:
                by = f["ours"][key]
                lines.append(f"| {seed} | {name} | {f['ours'][chosen]:g} | {float(pick(by, key=by.get)):g} | "
                             + " | ".join(f"{by[str(c)]:.4f}" for c in candidates) + " |")
    return lines


def draw_choices(path: Path, fits: dict[int, dict], higher_is_better: bool) -> None:
    """The report's choices as a figure: per choice, the fit's simulated devices' errors and
    the new (and held-out) devices' scores at every candidate, each from its own best."""
    curves, chosen = {}, {}
    for suffix, (chosen_key, errors_key, title) in REPORTED.items():
        keys = {"the fit's simulated devices": errors_key, "new devices": f"new_devices_by_{suffix}",
                "held out of the fit": f"held_out_by_{suffix}", "held out, by uploads": f"held_out_uploads_by_{suffix}"}
        curves[title] = {seed: {group: f["ours"][key] for group, key in keys.items() if key in f["ours"]}
                         for seed, f in fits.items()}
        chosen[title] = {seed: str(f["ours"][chosen_key]) for seed, f in fits.items()}
    plots.choices_figure(path, curves, chosen, higher_is_better)


def table(family: TaskFamily, per_seed: dict[int, dict[str, list[float]]]) -> list[str]:
    """Mean per seed and over seeds; 'ours better' is the share of new devices (all seeds) on
    which ours (fast) beats the method."""
    seeds = sorted(per_seed)
    sign = 1.0 if family.score.higher_is_better else -1.0
    lines = [f"| method ({family.score.name}) | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | ours better |",
             "|---" * (len(seeds) + 3) + "|"]
    for method in per_seed[seeds[0]]:
        means = [sum(per_seed[s][method]) / len(per_seed[s][method]) for s in seeds]
        better = [sign * (o - m) > 0 for s in seeds for o, m in zip(per_seed[s]["ours"], per_seed[s][method])]
        share = "—" if method == "ours" else f"{100 * sum(better) / len(better):.0f} %"
        lines.append(f"| {method} | " + " | ".join(f"{v:.4f}" for v in means) + f" | {sum(means) / len(means):.4f} | {share} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="bump_family:BumpFamily",
                    help="registered name or 'package.module:object'")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/family_zero_shot"))
    ap.add_argument("--devices", type=int, default=200, help="zoo devices per seed")
    ap.add_argument("--n-test", type=int, default=100, help="new devices per seed")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--held-out", type=int, default=0,
                    help="zoo devices trained alike but left out of the fit, scored at every ridge and step count")
    args = ap.parse_args()
    if args.held_out < 0:
        ap.error("--held-out must be >= 0")
    family = get_family(args.family)
    results = {seed: seed_scores(family, args.devices, args.n_test, seed, args.held_out) for seed in args.seeds}
    per_seed = {seed: scores for seed, (scores, _) in results.items()}
    lines = table(family, per_seed) + choice_lines(family, {seed: fits for seed, (_, fits) in results.items()})
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "family_zero_shot.md").write_text("\n".join(lines) + "\n")
    draw_choices(args.out / "choices.png", {seed: fits for seed, (_, fits) in results.items()},
                 family.score.higher_is_better)
    (args.out / "family_zero_shot.json").write_text(json.dumps(
        {"family": args.family, "score": family.score.name, "higher_is_better": family.score.higher_is_better,
         "devices": args.devices, "n_test": args.n_test, "held_out": args.held_out, "scores": per_seed,
         "fits": {seed: fits for seed, (_, fits) in results.items()}}, indent=1))


if __name__ == "__main__":
    main()
