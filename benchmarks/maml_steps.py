"""How far more meta-steps carry the sine benchmark's MAML: one run, scored at checkpoints.

    python benchmarks/maml_steps.py --out runs/maml_steps [--steps 70000] [--seed 0] [--arch 'MAML [1-40-40-1]']

``fedfuse bench sine`` meta-trains MAML for 20,000 steps, Finn et al. for 70,000. This trains
each MAML architecture once for ``--steps`` meta-steps on the bench's training tasks of one
seed (the same episodes: 25 tasks of 10 + 10 points per step), keeps the base net at
checkpoints, and scores each on the bench's unseen test tasks and shots, adapted both ways the
bench adapts MAML (Adam fine-tuning, 500 steps at lr 1e-2; its own SGD, 10 steps). Writes
maml_steps.json, maml_steps.md and maml_steps.png (nRMSE against meta-steps, the paper's
[1-40-40-1] dotted).
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import torch

from fedfuse.tasks import sine
from fedfuse.training import train_networks
from fedfuse_sim import plots
from fedfuse_sim.sine import MAML_SPECS, PAPER, SHOTS, SineConfig, fit_maml, shot_inputs, unseen_tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=70_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every", type=int, default=10_000, help="checkpoint spacing (20,000 is always kept)")
    parser.add_argument("--n-test", type=int, default=SineConfig.n_test, help="unseen test tasks scored")
    parser.add_argument("--arch", choices=sorted(MAML_SPECS), action="append",
                        help="which MAML (default: both)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    cfg = SineConfig(maml_steps=args.steps, n_test=args.n_test)
    checkpoints = tuple(sorted({*range(args.every, args.steps + 1, args.every), min(20_000, args.steps)}))
    train = sine.sample_tasks(cfg.n_train, args.seed)
    test = unseen_tasks(cfg.n_test, args.seed)
    rows = []
    for name in args.arch or sorted(MAML_SPECS):
        spec = MAML_SPECS[name]
        t0 = time.perf_counter()
        maml = fit_maml(spec, train, cfg, args.seed, True, checkpoints)
        fit_s = time.perf_counter() - t0
        for step in checkpoints:
            maml.theta_ = maml.checkpoints_[step]
            row = {"method": name, "meta_steps": step, "fit_s_total": round(fit_s, 1),
                   "query_loss": sum(maml.history_[max(0, step - 1000):step]) / min(step, 1000)}
            for k in cfg.shots:
                x = shot_inputs(len(test), k, args.seed)
                adam = partial(train_networks, spec, maml.init(len(test)), steps=cfg.finetune_steps, lr=cfg.finetune_lr)
                row[f"adam {k}"] = float(sine.nrmse(spec, adam(x, test(x)), test).mean())
                row[f"own SGD {k}"] = float(sine.nrmse(spec, maml.train_networks(x, test(x), cfg.maml_test_steps), test).mean())
            rows.append(row)
            print(json.dumps(row), flush=True)
    (args.out / "maml_steps.json").write_text(json.dumps({"seed": args.seed, "rows": rows}, indent=1))
    head = ["method", "meta-steps", "query loss (last 1,000)"] + [f"{a}, {k} shots" for a in ("Adam", "own SGD") for k in cfg.shots]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], f"{r['meta_steps']:,}", f"{r['query_loss']:.4f}"]
        cells += [f"{r[f'{a} {k}']:.4f}" for a in ("adam", "own SGD") for k in cfg.shots]
        lines.append("| " + " | ".join(cells) + " |")
    (args.out / "maml_steps.md").write_text("\n".join(lines) + "\n")
    shots = tuple(k for k in cfg.shots if k)
    paper = dict(zip(SHOTS, PAPER["MAML [1-40-40-1]"]))  # the paper's figures are at SHOTS
    plots.meta_steps_figure(args.out / "maml_steps.png", rows, shots,
                            {"MAML [1-40-40-1]": {k: paper[k] for k in shots}})


if __name__ == "__main__":
    main()
