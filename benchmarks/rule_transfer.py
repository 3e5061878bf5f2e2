"""Does the device's rule, chosen on the sine zoos, hold for another squared-error family?

    python benchmarks/rule_transfer.py --family bump_family:BumpFamily --out runs/bench/rule_transfer

``RULES["mse", ...]`` (``fedfuse.adaptation``) was chosen once, on the pseudo-devices of the three
sine bench zoos, and every squared-error family uses it. Per seed this fits a fresh zoo of the
family (``--devices`` simulated devices, each training its own net by the family's recipe), builds
its pseudo-devices (``benchmarks/adaptation.py``'s: leave-one-out initializers, probe outputs as
shots) and ``--n-test`` new devices of the family with 10/20/30/40 shots of their own, and scores
every rule of adaptation.py's grid on both: the pseudo-devices' error over their initializer's
and share made worse, the new devices' mean score (the family's own, on the examples they hold
back) and share made worse than their 0-shot. The report names the rule this zoo alone would
pick (adaptation.py's choice, applied to one zoo) next to the default, so a reader sees whether
a rule chosen per zoo at fit time would serve the family better than the sine-chosen one.

``--sine runs/bench/adaptation/adaptation.json``: also the validated choice, which is how the
default is chosen: the rule with the lowest mean error on the sine zoos' pseudo-devices among
those that leave at most 5 % of them worse (adaptation.py's bound) *and* at most 5 % of this
family's new devices worse at every shot count (pooled over seeds): the pseudo-devices understate
the harm real devices meet, and the family's new devices are a validation set no benchmark
scores. ``--also runs/.../rule_transfer.json ...``: other families' reports of the same path,
which the choice must pass as well, each family on its own (``RULES`` is validated on the bump,
step and wave families of ``simulations/examples/bump_family``).

Writes rule_transfer.json and rule_transfer.md. The family's new devices validate ``RULES`` (with
``--sine``); the sine benchmark's test tasks never enter, and nothing else here is a setting.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from adaptation import GRID, HARM_BOUND, SHOTS, PseudoDevices, rule_name, rule_table, score_rules, zoo_choice
from fedfuse.adaptation import RULES, CrossValidation, cross_validate
from fedfuse.meta_model import MetaModel
from fedfuse.posterior import WeightPosterior
from fedfuse.tasks import DeviceConfig, TaskFamily, get_family
from fedfuse.training import train_networks
from fedfuse.zoo import ModelZoo


def zoo_of(family: TaskFamily, devices: int, seed: int) -> ModelZoo:
    """``devices`` simulated zoo devices of ``family``, each net trained from its own init by the
    family's recipe (one batched run: the devices' examples must have one shape)."""
    cfg = DeviceConfig(num_clients=devices, num_new=0, seed=seed, shots=0)
    data = [family.simulated_device(i, cfg) for i in range(devices)]
    r = family.recipe
    init = family.arch.init(devices, torch.Generator().manual_seed(seed))
    weights = train_networks(family.arch, init, torch.stack([d.x for d in data]), torch.stack([d.y for d in data]),
                             r.train_steps, r.train_lr, loss=family.loss, batch_size=r.batch_size, seed=seed)
    return ModelZoo(family.arch, weights, torch.tensor([d.tau for d in data]), [d.client_id for d in data],
                    [len(d.x) for d in data])


def transfer(family: TaskFamily, devices: int, n_test: int, seed: int, distill: bool) -> list[dict[str, Any]]:
    """Every rule of the grid on one fresh zoo's pseudo-devices and on new devices of the family."""
    zoo = zoo_of(family, devices, seed)
    model = MetaModel(seed=seed, progress=False, **family.meta_model_settings()).fit(zoo, probe=family.probe(seed))
    pseudo = PseudoDevices.of(model, zoo.tau, distill)
    posts: dict[bytes, WeightPosterior] = {}  # the same new devices at every shot count: personalized (distilled) once
    rows = []
    for k in SHOTS:
        cfg = DeviceConfig(num_clients=devices, num_new=n_test, seed=seed, shots=k)
        new = [family.simulated_device(devices + j, cfg) for j in range(n_test)]
        tau = torch.tensor([d.tau for d in new])
        key = tau.numpy().tobytes()
        if key not in posts:
            posts[key] = model.personalize(tau, distill=distill)
        post = posts[key]
        x, y = torch.stack([d.x for d in new]), torch.stack([d.y for d in new])

        def score(w: torch.Tensor) -> torch.Tensor:
            return torch.stack([family.evaluate(w[j : j + 1], d)[0] for j, d in enumerate(new)])

        def cv(folds: int | None) -> CrossValidation:
            return cross_validate(family.arch, post.mean, post.readout, x, y, folds=folds)

        rows += score_rules(pseudo, k, seed, cv, score, score(post.mean), "test_score", not family.score.higher_is_better)
    return rows


def validated_choice(sine_rows: list[dict[str, Any]], *families: list[dict[str, Any]]) -> str | None:
    """The sine zoos' choice (``zoo_choice``) among the rules that every family's new devices
    were scored under at every shot count and that leave at most :data:`HARM_BOUND` of them
    worse at each, pooled over that family's seeds (a rule a family never scored is not
    validated)."""
    if not families:
        raise ValueError("a validated choice needs at least one family's rows")
    passed: set[str] | None = None
    for rows in families:
        shares: dict[str, dict[int, list[float]]] = {}
        for r in rows:
            shares.setdefault(r["rule"], {}).setdefault(r["shots"], []).append(r["test_worse"])
        mine = {name for name, by_k in shares.items()  # float32 shares
                if all(k in by_k and sum(by_k[k]) / len(by_k[k]) <= HARM_BOUND + 1e-6 for k in SHOTS)}
        passed = mine if passed is None else passed & mine
    return zoo_choice([r for r in sine_rows if r["rule"] in (passed or set())])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="bump_family:BumpFamily",
                    help="a squared-error family: registered name or 'package.module:object'")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/rule_transfer"))
    ap.add_argument("--devices", type=int, default=200, help="zoo devices per seed")
    ap.add_argument("--n-test", type=int, default=100, help="new devices per seed")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5],
                    help="one fresh zoo each (the validation of RULES used these six)")
    ap.add_argument("--distill", action="store_true", help="the distilled path, pseudo-devices distilled alike")
    ap.add_argument("--sine", type=Path, default=None,
                    help="an adaptation.json of the same path from benchmarks/adaptation.py: also the validated choice")
    ap.add_argument("--also", type=Path, nargs="+", default=[],
                    help="rule_transfer.json reports of other families, same path: the validated choice must pass them too")
    args = ap.parse_args()
    sine_rows = None
    if args.sine:
        sine = json.loads(args.sine.read_text())
        if sine.get("distill") != args.distill:
            ap.error(f"{args.sine} is the {'distilled' if sine.get('distill') else 'fast'} path's report (or does not "
                     f"say); run with{'' if sine.get('distill') else 'out'} --distill, or adaptation.py again")
        sine_rows = sine["acceptance"]
    others = [json.loads(p.read_text()) for p in args.also]
    grid = {rule_name(r) for r in GRID}
    for p, other in zip(args.also, others):
        if not {"family", "rows", "distill"} <= other.keys():
            ap.error(f"{p} is not a rule_transfer.json report (it needs family, rows and distill)")
        if other["distill"] != args.distill:
            ap.error(f"{p} is the {'distilled' if other['distill'] else 'fast'} path's report")
        if other["family"] == args.family or [o["family"] for o in others].count(other["family"]) > 1:
            ap.error(f"{p}: {other['family']} is validated on twice; give each family once")
        if {r["rule"] for r in other["rows"]} != grid:
            ap.error(f"{p} scored another grid of rules than this one's {len(grid)}: run it again")
    if others and sine_rows is None:
        ap.error("--also validates a choice: give --sine too")
    family = get_family(args.family)
    if family.loss != "mse":
        ap.error(f"{args.family} trains with {family.loss!r}: the grid is the squared-error device's")
    probe = family.probe(0)
    if probe is None or len(probe) <= max(SHOTS):
        ap.error(f"{args.family} needs a probe of more than {max(SHOTS)} inputs for its pseudo-devices' shots")
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    picks = {}
    for seed in args.seeds:
        mine = transfer(family, args.devices, args.n_test, seed, args.distill)
        picks[seed] = zoo_choice(mine)
        rows += mine
        print(f"seed {seed}: this zoo's pick: {picks[seed]}", flush=True)
    default = rule_name(RULES["mse", args.distill])
    report = {"family": args.family, "distill": args.distill, "default": default, "zoo_choice": picks, "rows": rows}
    if sine_rows is not None:
        report["validated_on"] = {args.family: list(args.seeds),
                                  **{o["family"]: sorted({r["seed"] for r in o["rows"]}) for o in others}}
        report["validated_choice"] = validated_choice(sine_rows, rows, *(o["rows"] for o in others))
    (args.out / "rule_transfer.json").write_text(json.dumps(report, indent=2))
    validated = [report["validated_choice"]] if sine_rows is not None and report["validated_choice"] else []
    shown = list(dict.fromkeys([default, *(p for p in picks.values() if p), *validated]))
    lines = [f"## The device's rule on {args.family}" + (" (distilled path)" if args.distill else ""), "",
             f"Default (`RULES`): **{default}**. Each zoo's own pick: "
             + ", ".join(f"seed {s}: {p}" for s, p in picks.items()) + "."
             + (f" Validated choice (the sine zoos' among the rules harming at most 5 % of the new devices of "
                f"{', '.join(report['validated_on'])}, each): **{report['validated_choice']}**."
                if sine_rows is not None else ""), "",
             "| rule | zoo max worse | zoo error / 0-shot, 10/20/30/40 shots | new devices' "
             f"{family.score.name}, 10/20/30/40 | new devices' share worse, 10/20/30/40 |", "|---|---|---|---|---|"]
    for seed in args.seeds:
        lines.append(f"| **seed {seed}** | | | | |")
        lines += rule_table([r for r in rows if r["seed"] == seed and r["rule"] in shown], score="test_score")
    lines += ["", "Every rule, seed means:", "", "| rule | zoo max worse | zoo error / 0-shot | "
              f"{family.score.name} | share worse |", "|---|---|---|---|---|"]
    lines += rule_table(rows, score="test_score")
    (args.out / "rule_transfer.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[: lines.index("Every rule, seed means:")]))


if __name__ == "__main__":
    main()
