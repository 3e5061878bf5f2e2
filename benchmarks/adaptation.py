"""Where the sine initializer's error sits, and what adaptation levers buy: a report on saved fits.

    python benchmarks/adaptation.py --bench runs/final/sine --out runs/bench/adaptation

Reads the meta-models a ``fedfuse bench sine --out DIR`` run saved (``meta_model_seed{s}``) and,
per seed, on the same test tasks and shots as the bench:

* **edges**: relative RMS error (over the amplitude) per eighth of ``[-5, 5]`` of the uploaded
  nets (against their own tasks), of the GP's predicted function and of the initializer (against
  the test tasks).
* **acceptance**: the device keeps an update only when its held-out shots beat the initializer by
  ``t`` standard errors (``condition_readout(threshold=t)``; the default is ``THRESHOLDS``), scored
  on the test tasks and on *pseudo-devices* the server can build from the zoo alone: each upload
  predicted from the others (leave-one-out), ``k`` of its probe outputs as shots, scored on the
  probe against the upload.
* **covariance**: the readout prior's residual covariance, shared by all tasks (the product) or
  local (the leave-one-out residuals of the ``m`` nearest zoo models, shrunk by ``lam`` towards
  the shared one; ``m`` and ``lam`` by the zoo's held-out Gaussian likelihood of each model's own
  residual), conditioned exactly at fixed strengths ``c``; and, as an upper bound no server can
  reach, the test tasks' own residual covariance.

Writes adaptation.json and adaptation.md. Test tasks only score; nothing here is a setting.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fedfuse.adaptation import condition_readout
from fedfuse.meta_model import MetaModel
from fedfuse.readout import design, readout_map
from fedfuse.tasks import sine

SHOTS = (10, 20, 30, 40)
THRESHOLDS = (0.0, 1.0, 2.0, 3.0)
STRENGTHS = (0.1, 1.0)
LOCAL_GRID = ((16, 0.5), (32, 0.3), (32, 0.5), (64, 0.1), (64, 0.2), (64, 0.3), (64, 0.5))
BINS = 8


def _bins(rel: Tensor) -> list[float]:
    """RMS of ``rel`` ``(q, N)`` over tasks, per eighth of the inputs."""
    return [round(float(part.pow(2).mean().sqrt()), 4) for part in rel.chunk(BINS, dim=1)]


def edges(model: MetaModel, test: sine.SineTasks, post: Any) -> dict[str, list[float]]:
    fn, probe = model.function_, model.probe_
    tau = fn.x_ * fn.tau_scale_ + fn.loc_
    zoo = sine.SineTasks(tau[:, 0].float(), tau[:, 1].float(), torch.zeros(len(tau)))
    uploads = (fn.y_ + fn.mu_).float()
    truth = test(probe)[..., 0]
    with torch.no_grad():
        net = sine.SPEC.forward(post.mean, probe)[..., 0]
    gp = fn.predict(test.tau.double()).mean.float()
    return {"uploads": _bins((uploads - zoo(probe)[..., 0]) / zoo.a[:, None]),
            "GP prediction": _bins((gp - truth) / test.a[:, None]),
            "initializer": _bins((net - truth) / test.a[:, None])}


def acceptance(model: MetaModel, test: sine.SineTasks, post: Any, seed: int) -> list[dict[str, Any]]:
    spec, fn, probe = sine.SPEC, model.function_, model.probe_
    n = fn.y_.shape[0]
    uploads = (fn.y_ + fn.mu_).float()
    zoo_post = model.personalize((fn.x_ * fn.tau_scale_ + fn.loc_).float())
    loo_mean, loo_scale = fn.loo_predictions(torch.arange(n))
    w_zoo, prior_zoo = model._readout_prior(zoo_post.mean, loo_mean.float(), loo_scale.float())

    def zoo_error(w: Tensor) -> Tensor:
        with torch.no_grad():
            f = spec.forward(w, probe)[..., 0]
        return (f - uploads).pow(2).mean(1).sqrt() / (uploads.max(1).values - uploads.min(1).values)

    zoo0, test0 = zoo_error(w_zoo), sine.nrmse(spec, post.mean, test)
    rows = []
    for k in SHOTS:
        gen = torch.Generator().manual_seed(seed * 1000 + k)
        pick = torch.stack([torch.randperm(probe.shape[0], generator=gen)[:k] for _ in range(n)])
        xs, ys = probe[pick], torch.gather(uploads, 1, pick)[..., None]
        x = sine.sample_x(len(test), k, seed + 1000 + k)  # the bench's shots
        for t in THRESHOLDS:
            ez = zoo_error(condition_readout(spec, w_zoo, prior_zoo, xs, ys, "mse", threshold=t))
            et = sine.nrmse(spec, condition_readout(spec, post.mean, post.readout, x, test(x), "mse", threshold=t), test)
            rows.append({"seed": seed, "shots": k, "threshold": t,
                         "zoo_ratio": float(ez.mean() / zoo0.mean()), "zoo_worse": float((ez > zoo0).float().mean()),
                         "test_nrmse": float(et.mean()), "test_worse": float((et > test0).float().mean())})
    return rows


def _held_out_loglik(z: Tensor, cov: Tensor) -> float:
    """Mean Gaussian log-density of each row of ``z`` under its own covariance ``(n, m, m)``."""
    chol = torch.linalg.cholesky(cov + 1e-9 * torch.eye(cov.shape[-1], dtype=cov.dtype))
    sol = torch.cholesky_solve(z[..., None], chol)[..., 0]
    return float((-0.5 * (z * sol).sum(1) - torch.diagonal(chol, dim1=1, dim2=2).log().sum(1)).mean())


def covariance(model: MetaModel, test: sine.SineTasks, post: Any, seed: int) -> dict[str, Any]:
    spec, fn, probe = sine.SPEC, model.function_, model.probe_
    loo = fn._loo(fn.kernel_, fn.log_noise_, fn.x_, fn.y_, None)
    z = loo.residual / loo.variance.sqrt()[:, None]  # standardized leave-one-out residuals (n, m)
    n, m = z.shape
    gram = z.T @ z
    shared_loo = (gram[None] - z[:, :, None] * z[:, None, :]) / (n - 1)  # without each model itself
    pts = fn._metric(fn.x_)
    order = fn._nearest(pts, pts, exclude=torch.arange(n), count=n - 1)
    scores = {"shared": _held_out_loglik(z, shared_loo)}
    for size, lam in LOCAL_GRID:
        near = z[order[:, :size]]
        scores[f"local {size}, lam {lam}"] = _held_out_loglik(
            z, (1 - lam) * near.transpose(1, 2) @ near / size + lam * shared_loo)
    best = max((k for k in scores if k != "shared"), key=scores.get)
    size, lam = (float(v) for v in re.findall(r"[\d.]+", best))
    size = int(size)

    shared = fn.basis_.double().T @ fn.basis_.double() + torch.diag(fn.residual_.double())  # calibrated
    kappa = shared.trace() / (gram / n).trace()
    pred = fn.predict(test.tau.double())
    near = z[fn._nearest(fn._metric(fn._inputs(test.tau.double())), pts, count=size)]
    local = kappa * ((1 - lam) * near.transpose(1, 2) @ near / size + lam * gram / n)
    with torch.no_grad():
        residual = (test(probe)[..., 0] - spec.forward(post.mean, probe)[..., 0]).double()
    oracle = residual.T @ residual / len(test)
    covs = {"shared (product)": pred.scale.double()[:, None, None] ** 2 * shared,
            "local (m, lam: the zoo's choice)": pred.scale.double()[:, None, None] ** 2 * local,
            "test tasks' own (upper bound)": oracle.expand(len(test), -1, -1)}
    a, _ = readout_map(spec, post.mean, probe, model.readout_ridge_)  # (q, h + 1, probe): readout per function
    grid = sine.eval_grid()
    phi_grid = design(spec, post.mean, grid.expand(len(test), -1, -1))
    loc = post.readout.loc.double()[..., None]
    truth = test(grid).double()
    zero = sine.nrmse(spec, post.mean, test).double()
    rows = []
    for k in SHOTS:
        x = sine.sample_x(len(test), k, seed + 1000 + k)
        phi = design(spec, post.mean, x)
        r = test(x).double() - phi @ loc
        for name, cov in covs.items():
            ms, mg = phi @ a, phi_grid @ a
            kss, kgs = ms @ cov @ ms.transpose(1, 2), mg @ cov @ ms.transpose(1, 2)
            unit = torch.diagonal(kss, dim1=1, dim2=2).mean(1)
            for c in STRENGTHS:
                f = phi_grid @ loc + kgs @ torch.linalg.solve(kss + c * unit[:, None, None] * torch.eye(k, dtype=kss.dtype), r)
                e = ((f - truth) ** 2).mean((1, 2)).sqrt() / (2 * test.a.double())
                rows.append({"seed": seed, "shots": k, "covariance": name, "strength": c,
                             "test_nrmse": float(e.mean()), "test_worse": float((e > zero).float().mean())})
    return {"zoo_loglik": scores, "choice": best, "rows": rows}


def _table(rows: list[dict[str, Any]], keys: tuple[str, ...], cells: tuple[str, ...]) -> list[str]:
    """Rows averaged over seeds: one line per ``keys`` value, ``cells`` as mean (share worse)."""
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
    ap.add_argument("--bench", type=Path, default=Path("runs/final/sine"), help="a `fedfuse bench sine` output")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/adaptation"))
    ap.add_argument("--n-test", type=int, default=100, help="test tasks per seed, as in the bench")
    args = ap.parse_args()
    torch.set_num_threads(2)
    paths = sorted(args.bench.glob("meta_model_seed*.safetensors"))
    if not paths:
        ap.error(f"{args.bench} holds no meta_model_seed*.safetensors: run `fedfuse bench sine --out {args.bench}`")
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"edges": {}, "acceptance": [], "covariance": {}}
    for path in paths:
        seed = int(re.search(r"seed(\d+)", path.name).group(1))
        model = MetaModel.load(path)
        test = sine.sample_tasks(args.n_test, seed + sine.TEST_SEED_OFFSET)
        post = model.personalize(test.tau)
        report["edges"][seed] = edges(model, test, post)
        cov = covariance(model, test, post, seed)
        report["covariance"][seed] = {k: cov[k] for k in ("zoo_loglik", "choice")}
        report["covariance_rows"] = report.get("covariance_rows", []) + cov["rows"]
        report["acceptance"] += acceptance(model, test, post, seed)
        print(f"seed {seed} done: local covariance chosen on the zoo: {cov['choice']}", flush=True)
    (args.out / "adaptation.json").write_text(json.dumps(report, indent=2))
    lines = ["## Relative RMS error per eighth of [-5, 5] (seed means)", "",
             "| what | " + " | ".join(f"bin {i + 1}" for i in range(BINS)) + " |", "|---|" + "---|" * BINS]
    for what in ("uploads", "GP prediction", "initializer"):
        vals = [sum(report["edges"][s][what][i] for s in report["edges"]) / len(report["edges"]) for i in range(BINS)]
        lines.append(f"| {what} | " + " | ".join(f"{v:.4f}" for v in vals) + " |")
    lines += ["", "## Acceptance threshold t (seed means): zoo pseudo-devices and test tasks", "",
              "| shots | t | zoo error / 0-shot | zoo share worse | test nRMSE | test share worse |", "|---|---|---|---|---|---|"]
    lines += _table(report["acceptance"], ("shots", "threshold"), ("zoo_ratio", "zoo_worse", "test_nrmse", "test_worse"))
    choices = ", ".join(f"seed {s}: {c['choice']}" for s, c in report["covariance"].items())
    lines += ["", f"## Residual covariance at fixed strength c, exact conditioning (seed means; local: {choices})", "",
              "| shots | covariance | c | test nRMSE | test share worse |", "|---|---|---|---|---|"]
    lines += _table(report["covariance_rows"], ("shots", "covariance", "strength"), ("test_nrmse", "test_worse"))
    (args.out / "adaptation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
