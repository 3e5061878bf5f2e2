"""Where the sine initializer's error sits, and what adaptation levers buy: a report on saved fits.

    python benchmarks/adaptation.py --bench runs/bench/sine --out runs/bench/adaptation

Reads the meta-models a ``fedfuse bench sine --out DIR`` run saved (``meta_model_seed{s}``) and,
per seed, on the same test tasks and shots as the bench:

* **edges**: relative RMS error (over the amplitude) per eighth of ``[-5, 5]`` of the uploaded
  nets (against their own tasks), of the GP's predicted function and of the initializer (against
  the test tasks); and the floor of the readout: the least-squares readout on the initializer's
  hidden layer fitted to each test function on the evaluation grid.
* **acceptance**: the device keeps an update only when its held-out shots beat the initializer by
  ``t`` standard errors (Student's margin for its shot count), takes a share (``shrink``) of it,
  and considers the cross-validation's best strength only or any strength that clears the
  margin, judged by 5-fold or leave-one-out cross-validation on the held-out shots' squared or
  absolute errors, or a smaller margin where the initializer misses the device's own shots (416 rules, ``fedfuse.adaptation.Acceptance``;
  the device's default is ``fedfuse.adaptation.RULES`` of the path). Every rule of the grid is
  scored on the test tasks and on *pseudo-devices* the server can build from the zoo alone:
  each upload's function and readout prior predicted from the others (leave-one-out; the hidden
  layer is the decoded one at its descriptor, as a new device gets), ``k`` of its probe outputs
  as shots, scored against the upload on the other probe inputs. The zoo's choice: the rule
  with the lowest mean pseudo-device error among those leaving at most 5 % of pseudo-devices
  worse than their initializer at every shot count on every seed.
* **covariance**: the readout prior's residual covariance, shared by all tasks (the product) or
  the one the fit chose (``FunctionSpaceGP``: the leave-one-out residuals of the nearest zoo
  models shrunk towards the shared one, by the zoo's held-out likelihood), conditioned exactly at
  fixed strengths ``c``; and, as an upper bound no server can reach, the test tasks' own
  residual covariance.

* **gate cost**: on the test tasks, the update taken on every device, taken only where it helps
  (an oracle), and the device's rule: how much of the update's gain the rule's margin gives up.

``--distill``: all of it for the slower path, ``personalize(distill=True)``, the pseudo-devices'
hidden layers distilled towards their leave-one-out predicted functions as a new device's are.

Writes adaptation.json and adaptation.md. Test tasks only score; the zoo's choice is an input to
``RULES`` (with ``rule_transfer.py --sine``'s validation), nothing else here is a setting.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from fedfuse.adaptation import RULES, Acceptance, CrossValidation, cross_validate
from fedfuse.function_space import FunctionSpaceGP
from fedfuse.meta_model import MetaModel
from fedfuse.posterior import ReadoutGaussian, WeightPosterior
from fedfuse.readout import design, solve_readout
from fedfuse.tasks import sine
from fedfuse_sim.sine import shot_inputs, unseen_tasks

SHOTS = (10, 20, 30, 40)
# the acceptance rules: margins in half standard errors, shares of the update, either selection of
# strength, 5-fold or leave-one-out, held-out shots judged by squared or absolute error
GRID = tuple(Acceptance(t, a, any_s, folds, absolute) for absolute in (False, True) for folds in (5, None)
             for any_s in (False, True) for t in (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0) for a in (1.0, 0.7, 0.5, 0.35)) + tuple(
    # the margin by how far the initializer misses the device's own shots: a larger one where it fits them
    Acceptance(t, 1.0, any_s, folds, True, cut, far) for folds in (5, None) for any_s in (False, True)
    for t in (2.0, 2.5, 3.0) for cut in (0.01, 0.015, 0.02, 0.03) for far in (0.5, 1.0, 1.5, 2.0))
TAKE_ALL = Acceptance(-1e9, folds=5)  # no gate: the cross-validation's best strength, always taken
HARM_BOUND = 0.05  # the share of pseudo-devices an update may leave worse than their initializer
FIXED_C = (0.1, 1.0)  # strengths of the exact conditioning
BINS = 8


def _bins(rel: Tensor) -> list[float]:
    """RMS of ``rel`` ``(q, N)`` over tasks, per eighth of the inputs."""
    return [round(float(part.pow(2).mean().sqrt()), 4) for part in rel.tensor_split(BINS, dim=1)]


def zoo_descriptors(fn: FunctionSpaceGP) -> Tensor:
    """The zoo's descriptors, undoing the GP's standardization (sine kernels are never ``overlap``)."""
    if fn.kernel_name_ == "overlap":
        raise ValueError("this report is for sine zoos; an overlap kernel keeps raw set descriptors")
    return (fn.x_ * fn.tau_scale_ + fn.loc_).float()


def edges(model: MetaModel, test: sine.SineTasks, post: WeightPosterior) -> dict[str, Any]:
    """Where the error sits along the inputs, and how low the readout alone could take it."""
    fn, probe = model.function_, model.probe_
    tau = zoo_descriptors(fn)
    zoo = sine.SineTasks(tau[:, 0], tau[:, 1], torch.zeros(len(tau)))
    uploads = (fn.y_ + fn.mu_).float()
    truth = test(probe)[..., 0]
    with torch.no_grad():
        net = sine.SPEC.forward(post.mean, probe)[..., 0]
    gp = fn.predict(test.tau.double()).mean.float()
    grid = sine.eval_grid()
    phi = design(sine.SPEC, post.mean, grid.expand(len(test), -1, -1))
    target = test(grid).double()
    best = torch.linalg.lstsq(phi, target, driver="gelsd").solution
    floor = ((phi @ best - target) ** 2).mean((1, 2)).sqrt() / (2 * test.a.double())
    return {"uploads": _bins((uploads - zoo(probe)[..., 0]) / zoo.a[:, None]),
            "GP prediction": _bins((gp - truth) / test.a[:, None]),
            "initializer": _bins((net - truth) / test.a[:, None]),
            "readout floor nRMSE": float(floor.mean()), "0-shot nRMSE": float(sine.nrmse(sine.SPEC, post.mean, test).mean())}


def rule_name(rule: Acceptance) -> str:
    return (f"t {rule.threshold:g}, shrink {rule.shrink:g}, " + ("any strength" if rule.any_strength else "best strength")
            + (", leave-one-out" if rule.folds is None else f", {rule.folds}-fold")
            + (", absolute error" if rule.absolute else "")
            + ("" if rule.misfit_cut is None else f", t {rule.misfit_threshold:g} from misfit {rule.misfit_cut:g}"))


@dataclass
class PseudoDevices:
    """The zoo's uploads as new devices the server can build alone: each upload's function and
    readout prior predicted from the others (leave-one-out; the hidden layer is the decoded one
    at its descriptor, as a new device gets, distilled as ``personalize(distill=True)`` distills),
    ``k`` of its probe outputs as shots, scored against the upload on the other probe inputs."""

    model: MetaModel
    initializer: Tensor  # (n, d)
    prior: ReadoutGaussian
    uploads: Tensor  # (n, m, out): each upload's function on the probe

    @classmethod
    def of(cls, model: MetaModel, tau: Tensor, distill: bool = False) -> PseudoDevices:
        """The pseudo-devices of a fitted zoo with descriptors ``tau`` ``(n, D)``."""
        fn = model.function_
        n = fn.y_.shape[0]
        uploads = (fn.y_ + fn.mu_).float().reshape(n, -1, model.spec_.num_outputs)
        loo, base = fn.loo_predictions(torch.arange(n)), model.decode(tau)
        if distill:
            base = model._distilled(model._solved_readout(base, loo.mean)[0], loo.mean)
        return cls(model, *model._readout_prior(base, loo), uploads)

    def shots(self, k: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
        """``k`` probe inputs per device ``(n, k, in)``, the upload's outputs there, and the
        probe inputs ``(n, m)`` each is scored on (the others)."""
        n, m, _ = self.uploads.shape
        gen = torch.Generator().manual_seed(seed * 1000 + k)
        pick = torch.stack([torch.randperm(m, generator=gen)[:k] for _ in range(n)])
        held = torch.ones(n, m).scatter_(1, pick, 0.0)
        return self.model.probe_[pick], self.uploads[torch.arange(n)[:, None], pick], held

    def error(self, w: Tensor, held: Tensor) -> Tensor:
        """Each device's RMS error ``(n,)`` against its upload on the probe inputs ``held`` marks,
        over the upload's range."""
        with torch.no_grad():
            sq = (self.model.spec_.forward(w, self.model.probe_) - self.uploads).pow(2).sum(-1)
        spread = self.uploads.amax((1, 2)) - self.uploads.amin((1, 2))
        return ((sq * held).sum(1) / held.sum(1)).sqrt() / spread


def score_rules(zoo: PseudoDevices, k: int, seed: int, new: Callable[[int | None], CrossValidation],
                score: Callable[[Tensor], Tensor], score0: Tensor, key: str, lower_is_better: bool = True
                ) -> list[dict[str, Any]]:
    """Every rule of :data:`GRID` at ``k`` shots, on the pseudo-devices and on new devices: the
    zoo's error over its initializer's, the share of each made worse, and the new devices' mean
    ``score`` (``key``) against their 0-shot ``score0``; ``new(folds)`` is the new devices'
    cross-validation on their own shots."""
    xs, ys, held = zoo.shots(k, seed)
    zoo0 = zoo.error(zoo.initializer, held)
    spec = zoo.model.spec_
    cvs = {folds: (cross_validate(spec, zoo.initializer, zoo.prior, xs, ys, folds=folds), new(folds))
           for folds in dict.fromkeys(rule.folds for rule in GRID)}
    sign = 1.0 if lower_is_better else -1.0
    rows = []
    for rule in GRID:
        cv_zoo, cv_new = cvs[rule.folds]
        ez, et = zoo.error(cv_zoo.conditioned(rule), held), score(cv_new.conditioned(rule))
        rows.append({"seed": seed, "shots": k, "rule": rule_name(rule),
                     "zoo_ratio": float(ez.mean() / zoo0.mean()), "zoo_worse": float((ez > zoo0).float().mean()),
                     key: float(et.mean()), "test_worse": float((sign * (et - score0) > 0).float().mean())})
    return rows


def acceptance(model: MetaModel, test: sine.SineTasks, post: WeightPosterior, seed: int,
               distill: bool = False) -> list[dict[str, Any]]:
    """Mean error and share of devices made worse for each rule, on pseudo-devices and tests;
    with ``distill`` the pseudo-devices' hidden layers are distilled as ``personalize(distill=True)``
    does (``post`` is then the distilled posterior)."""
    spec = sine.SPEC
    zoo = PseudoDevices.of(model, zoo_descriptors(model.function_), distill)
    nrmse = lambda w: sine.nrmse(spec, w, test)  # noqa: E731
    rows = []
    for k in SHOTS:
        x = shot_inputs(len(test), k, seed)
        new = lambda folds: cross_validate(spec, post.mean, post.readout, x, test(x), folds=folds)  # noqa: E731
        rows += score_rules(zoo, k, seed, new, nrmse, nrmse(post.mean), "test_nrmse")
    return rows


def gate_cost(test: sine.SineTasks, post: WeightPosterior, seed: int) -> list[dict[str, Any]]:
    """What the device's gate costs on the test tasks (scored only): the update at the 5-fold
    cross-validation's best strength taken on every device, taken only where it helps (an oracle:
    no device knows its test error), and the device's own rule."""
    spec, rule = sine.SPEC, RULES["mse", post.distilled]
    e0 = sine.nrmse(spec, post.mean, test)
    rows = []
    for k in SHOTS:
        x = shot_inputs(len(test), k, seed)
        cvs = {folds: cross_validate(spec, post.mean, post.readout, x, test(x), folds=folds)
               for folds in {TAKE_ALL.folds, rule.folds}}  # one cross-validation where both rules share it
        every = sine.nrmse(spec, cvs[TAKE_ALL.folds].conditioned(TAKE_ALL), test)
        device = sine.nrmse(spec, cvs[rule.folds].conditioned(rule), test)
        rows.append({"seed": seed, "shots": k, "every_nrmse": float(every.mean()),
                     "every_worse": float((every > e0).float().mean()), "oracle_nrmse": float(torch.minimum(every, e0).mean()),
                     "device_nrmse": float(device.mean()), "device_worse": float((device > e0).float().mean())})
    return rows


def zoo_choice(rows: list[dict[str, Any]]) -> str | None:
    """The rule the zoo alone picks: the lowest mean pseudo-device error ratio among the rules
    that leave at most :data:`HARM_BOUND` of the pseudo-devices worse at every shot count and seed."""
    over = {r["rule"] for r in rows if r["zoo_worse"] > HARM_BOUND + 1e-6}  # float32 shares
    ratio = {name: sum(r["zoo_ratio"] for r in rows if r["rule"] == name)
             for name in dict.fromkeys(r["rule"] for r in rows) if name not in over}
    return min(ratio, key=ratio.__getitem__, default=None)  # ties: the first in the grid's order


def covariance(model: MetaModel, test: sine.SineTasks, post: WeightPosterior, seed: int) -> dict[str, Any]:
    """Exact conditioning on the shots under the shared covariance, the one the fit chose (nearby
    models' residuals shrunk towards the shared one, or the shared one itself) and the test
    tasks' own residual covariance."""
    spec, fn, probe = sine.SPEC, model.function_, model.probe_
    pred = fn.predict(test.tau.double())
    scale2 = pred.scale.double()[:, None, None] ** 2
    shared = fn.basis_.double().T @ fn.basis_.double() + torch.diag(fn.residual_.double())  # calibrated
    fs = pred.factor().double()
    chosen = fs.transpose(1, 2) @ fs + torch.diag_embed(scale2[..., 0] * pred.residual.double())
    with torch.no_grad():
        residual = (test(probe)[..., 0] - spec.forward(post.mean, probe)[..., 0]).double()
    oracle = residual.T @ residual / len(test)
    covs = {"shared (product)": scale2 * shared, "the fit's choice": chosen,
            "test tasks' own (upper bound)": oracle.expand(len(test), -1, -1)}
    # (q, h + 1, probe): the readout's change per change of function on the probe (any target)
    _, a = solve_readout(spec, post.mean, probe, torch.zeros(len(test), len(probe), 1), model.readout_ridge_)
    x_eval = sine.eval_grid()
    phi_eval = design(spec, post.mean, x_eval.expand(len(test), -1, -1))
    mg = phi_eval @ a  # function on the grid per function on the probe
    loc = post.readout.loc.double()[..., None]
    truth = test(x_eval).double()
    zero = sine.nrmse(spec, post.mean, test).double()
    rows = []
    for k in SHOTS:
        x = shot_inputs(len(test), k, seed)
        phi = design(spec, post.mean, x)
        ms = phi @ a
        r = test(x).double() - phi @ loc
        for name, cov in covs.items():
            kss, kgs = ms @ cov @ ms.transpose(1, 2), mg @ cov @ ms.transpose(1, 2)
            unit = torch.diagonal(kss, dim1=1, dim2=2).mean(1)
            for c in FIXED_C:
                f = phi_eval @ loc + kgs @ torch.linalg.solve(kss + c * unit[:, None, None] * torch.eye(k, dtype=kss.dtype), r)
                e = ((f - truth) ** 2).mean((1, 2)).sqrt() / (2 * test.a.double())
                rows.append({"seed": seed, "shots": k, "covariance": name, "strength": c,
                             "test_nrmse": float(e.mean()), "test_worse": float((e > zero).float().mean())})
    choice = f"{fn.nearby_size_} nearby, lam {fn.nearby_shrink_}" if fn.nearby_size_ else "shared"
    return {"choice": choice, "rows": rows}


def rule_table(rows: list[dict[str, Any]], score: str = "test_nrmse") -> list[str]:
    """One line per acceptance rule: its worst zoo harm and its seed means per shot count."""
    out = []
    for name in dict.fromkeys(r["rule"] for r in rows):
        mine = [r for r in rows if r["rule"] == name]
        cell = lambda c: " / ".join(f"{sum(r[c] for r in mine if r['shots'] == k) / sum(r['shots'] == k for r in mine):.4f}"  # noqa: E731
                                    for k in SHOTS)
        out.append(f"| {name} | {max(r['zoo_worse'] for r in mine):.3f} | {cell('zoo_ratio')} | {cell(score)} | "
                   f"{cell('test_worse')} |")
    return out


def _table(rows: list[dict[str, Any]], keys: tuple[str, ...], cells: tuple[str, ...]) -> list[str]:
    """Rows averaged over seeds: one line per ``keys`` value, each of ``cells`` its mean."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    out = []
    for key, group in groups.items():
        mean = {c: sum(g[c] for g in group) / len(group) for c in cells}
        out.append("| " + " | ".join(map(str, key)) + " | " + " | ".join(f"{mean[c]:.4f}" for c in cells) + " |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench", type=Path, default=Path("runs/bench/sine"), help="a `fedfuse bench sine` output")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/adaptation"))
    ap.add_argument("--n-test", type=int, default=None,
                    help="test tasks per seed (default: the bench's, from its summary.json, else 100)")
    ap.add_argument("--distill", action="store_true",
                    help="the distilled path: personalize(distill=True), pseudo-devices distilled alike")
    args = ap.parse_args()
    paths = sorted(args.bench.glob("meta_model_seed*.safetensors"))
    if not paths:
        ap.error(f"{args.bench} holds no meta_model_seed*.safetensors: run `fedfuse bench sine --out {args.bench}`")
    summary = args.bench / "summary.json"
    n_test = args.n_test or (json.loads(summary.read_text())["config"]["n_test"] if summary.exists() else 100)
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"edges": {}, "acceptance": [], "covariance": {}, "covariance_rows": [], "gate_cost": []}
    device_rules: dict[str, None] = {}  # the devices' rules, in seed order
    for path in paths:
        seed = int(re.search(r"seed(\d+)", path.name).group(1))
        model = MetaModel.load(path)
        test = unseen_tasks(n_test, seed)
        post = model.personalize(test.tau, distill=args.distill)
        report["edges"][seed] = edges(model, test, post)
        cov = covariance(model, test, post, seed)
        report["covariance"][seed] = {"choice": cov["choice"]}
        report["covariance_rows"] += cov["rows"]
        report["acceptance"] += acceptance(model, test, post, seed, args.distill)
        report["gate_cost"] += gate_cost(test, post, seed)
        device_rules[rule_name(RULES["mse", post.distilled])] = None  # a zoo that chose 0 steps answers fast
        print(f"seed {seed} done: the fit's covariance: {cov['choice']}", flush=True)
    report["zoo_choice"] = zoo_choice(report["acceptance"])
    report["distill"] = args.distill  # which path's rule this is: rule_transfer.py --sine checks it
    (args.out / "adaptation.json").write_text(json.dumps(report, indent=2))
    lines = ["## Relative RMS error per eighth of [-5, 5] (seed means)", "",
             "| what | " + " | ".join(f"bin {i + 1}" for i in range(BINS)) + " |", "|---|" + "---|" * BINS]
    for what in ("uploads", "GP prediction", "initializer"):
        vals = [sum(report["edges"][s][what][i] for s in report["edges"]) / len(report["edges"]) for i in range(BINS)]
        lines.append(f"| {what} | " + " | ".join(f"{v:.4f}" for v in vals) + " |")
    lines += ["", "0-shot nRMSE and the least-squares readout's floor, per seed: " + ", ".join(
        f"seed {s}: {e['0-shot nRMSE']:.4f} / {e['readout floor nRMSE']:.4f}" for s, e in report["edges"].items())]
    device = " / ".join(device_rules)
    lines += ["", "## Acceptance rules (seed means): zoo pseudo-devices and test tasks", "",
              f"The zoo's choice: **{report['zoo_choice']}**; the device's default "
              f"(`RULES`): {device}. Zoo max worse: the largest share of pseudo-devices left worse "
              "over seeds and shot counts (the bound: 5 %).", "",
              "| rule | zoo max worse | zoo error / 0-shot, 10/20/30/40 shots | test nRMSE, 10/20/30/40 | "
              "test share worse, 10/20/30/40 |", "|---|---|---|---|---|"]
    lines += rule_table(report["acceptance"])
    lines += ["", "## What the gate costs (test tasks, scored only; seed means)", "",
              "The update at the 5-fold cross-validation's best strength taken on every device, taken only "
              "where it helps (an oracle), and the device's rule.", "",
              "| shots | every update | share worse | oracle | device's rule | share worse |", "|---|---|---|---|---|---|"]
    lines += _table(report["gate_cost"], ("shots",), ("every_nrmse", "every_worse", "oracle_nrmse", "device_nrmse", "device_worse"))
    choices = ", ".join(f"seed {s}: {c['choice']}" for s, c in report["covariance"].items())
    lines += ["", f"## Residual covariance at fixed strength c, exact conditioning (seed means; the fit's: {choices})", "",
              "| shots | covariance | c | test nRMSE | test share worse |", "|---|---|---|---|---|"]
    lines += _table(report["covariance_rows"], ("shots", "covariance", "strength"), ("test_nrmse", "test_worse"))
    (args.out / "adaptation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
