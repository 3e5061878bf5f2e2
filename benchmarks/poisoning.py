"""Poisoning the sine zoo: 10 % colluders (flipped or phase-shifted models claiming descriptors
near one task, tight or spread) and one extreme descriptor, against the fit. Prints what the
screening caught, its false positives, and 0-shot nRMSE of the honest-only fit, the attacked zoo
after screening and the attacked zoo as it is, over all test tasks and the 10 nearest the attack.

Usage: python benchmarks/poisoning.py [--models 150] [--test 60] [--out runs/bench]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fedfuse.screening import screen
from fedfuse.tasks import sine
from fedfuse_sim.poisoning import colluders, evaluate, extreme_descriptor, honest_zoo, zero_shot


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=int, default=150, help="uploads in the attacked zoo, 10 %% of them colluders")
    ap.add_argument("--test", type=int, default=60, help="new tasks the 0-shot nRMSE is measured on")
    ap.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    m = args.models // 10
    tasks, zoo = honest_zoo(args.models - m, seed=11)
    test = sine.sample_tasks(args.test, seed=13 + sine.TEST_SEED_OFFSET)
    honest = zero_shot(zoo, test)
    attacks = [colluders(m, kind, spread, seed=5) for kind in ("flip", "phase") for spread in (0.05, 0.3)]
    rows = [evaluate(zoo, attack, test, honest) for attack in [*attacks, extreme_descriptor(tasks, zoo)]]
    own = screen(zoo, sine.probe_grid())[1].excluded

    def cell(values: tuple[float, float, float]) -> str:
        clean, screened, unscreened = values
        return (f"{clean:.4f} | {screened:.4f} ({screened / clean - 1:+.0%}) | "
                f"{unscreened:.4f} ({unscreened / clean - 1:+.0%})")

    print(f"sine zoo: {len(zoo)} honest models + the attackers; {len(test)} test tasks; 0-shot nRMSE "
          "(honest-only | attacked, screened | attacked, unscreened)")
    print(f"honest zoo alone: {len(own)} excluded {own}\n")
    print("| attack | caught | false positives | all test tasks: honest | screened | unscreened "
          "| 10 nearest the attack: honest | screened | unscreened |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['attack']} | {r['caught']}/{r['attackers']} | {r['false_positives']} | {cell(r['all'])} "
              f"| {cell(r['nearest'])} |")
    print(f"\n{time.perf_counter() - start:.0f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "poisoning.json").write_text(json.dumps({"honest_zoo_excluded": own, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
