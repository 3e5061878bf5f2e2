"""Table 3 on one machine: 0-shot user embeddings for unseen MovieLens users.

Seen devices upload their own d-dim embedding (fitted locally against the public item
embeddings) and their descriptor (embedded context ratings) once. An unseen user gets an
embedding from its descriptor alone and is scored by RMSE on its held-out ratings of
non-context items. User models are bare vectors in the shared item space: their coordinates
already correspond, so there is no permutation to align. A user model's function is its
predicted ratings: the embedding against the public item features, which serve as the server's
probe; ``ours`` predicts a new user's ratings by the function-space GP and solves for the
embedding that gives them (``paper's decoder``: the decoded embedding).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fedfuse.datasets import Ratings, load_movielens_100k
from fedfuse.meta_model import MetaModel
from fedfuse.progress import progress_bar
from fedfuse.tasks import movielens as ml
from fedfuse.zoo import ModelZoo
from fedfuse_sim import baselines, calibration, plots, report

DIMS = (20, 30, 40)
PAPER = {  # Table 3 of the paper, RMSE of unseen users at 20/30/40 dims
    "ours": [1.16, 1.16, 1.22],
    "cold-start CF": [1.59, 2.02, 1.58],
    "1-NN": [1.26, 1.29, 1.28],
    "oracle CF": [0.97, 1.05, 1.01],
}


@dataclass
class MovieLensConfig:
    dims: tuple[int, ...] = DIMS
    seeds: tuple[int, ...] = (0, 1, 2)
    n_context: int = 300
    n_unseen: int = 143
    tau_dims: tuple[int, int] = (ml.RATING_DIM, ml.RATED_DIM)  # the descriptor's principal components
    reg: float = 10.0  # ridge weight of every CF and device fit (best of 5/10/20/40 for the CFs, seed 0)
    als_iters: int = 15
    zoo_users: int = 0  # seen users that upload (a seeded subset; 0: all 800): the fit grows with its square
    meta: dict[str, Any] = field(default_factory=lambda: {"hidden": (64,)})

    @classmethod
    def smoke(cls, seeds: tuple[int, ...] = (0,)) -> "MovieLensConfig":
        """A reduced size for CI: one embedding size, short CF and fit."""
        return cls(dims=(20,), seeds=seeds, als_iters=3, zoo_users=200,
                   meta={"hidden": (32,), "max_rounds": 2, "steps_per_round": 40})


def column(row: dict[str, Any]) -> str:
    return f"{row['dim']}-dim"


def run_seed(cfg: MovieLensConfig, seed: int, ratings: Ratings, progress: bool
             ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    torch.manual_seed(seed)
    sp = ml.split(ratings, seed, cfg.n_context, cfg.n_unseen)
    tau = ml.descriptors(ratings, sp, *cfg.tau_dims)
    seen = sp.seen
    if not 0 <= cfg.zoo_users <= len(seen):
        raise ValueError(f"zoo_users={cfg.zoo_users}: use 0 (all {len(seen)} seen users) up to {len(seen)}")
    if cfg.zoo_users:
        seen = seen[torch.randperm(len(seen), generator=torch.Generator().manual_seed(seed))[: cfg.zoo_users]].sort().values
    rows, timings, calib, recon, selected = [], {}, {}, {}, {}
    with progress_bar(progress, "MovieLens", total=len(cfg.dims)) as bar:
        for dim in cfg.dims:
            t0 = time.perf_counter()
            # the public item side; its last user step is what each seen device fits locally
            items, users = ml.als(ratings, sp.public_cf(), dim, cfg.reg, cfg.als_iters, seed)
            users = users[seen]
            zoo = ModelZoo(ml.spec(dim), users, tau[seen], [f"user-{int(u):04d}" for u in seen], [1] * len(seen))
            timings[f"{dim}-dim public CF s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            # a user model's function: its predicted ratings of every item (public item features)
            probe = items.features(torch.arange(ratings.num_items))
            meta = MetaModel(seed=seed, progress=progress, **cfg.meta).fit(zoo, probe=probe)
            timings[f"{dim}-dim fit s"] = time.perf_counter() - t0
            new_tau = tau[sp.unseen]
            post = meta.personalize(new_tau)
            neighbours = baselines.AlignedNeighbours().fit(zoo.spec, users, zoo.tau, probe)
            zero_shot = {
                "ours": post.mean,
                "paper's decoder": meta.decode(new_tau),
                "1-NN": baselines.nearest_neighbour(zoo.tau, users, new_tau),
                "k-NN average": neighbours.predict(new_tau),
                "zoo average": baselines.zoo_average(users, len(sp.unseen)),
            }
            scored: dict[str, tuple[ml.ItemModel, Tensor]] = {}
            for name, emb in zero_shot.items():
                full = torch.zeros(ratings.num_users, dim)
                full[sp.unseen] = emb
                scored[name] = (items, full)
            for name, mask in (("cold-start CF", sp.cold_start_cf()), ("oracle CF", sp.oracle_cf())):
                scored[name] = ml.als(ratings, mask, dim, cfg.reg, cfg.als_iters, seed)
            for name, (it, emb) in scored.items():
                ids, rmse = ml.user_rmse(it, emb, ratings, sp.is_test)
                rows += [{"seed": seed, "method": name, "dim": dim, "user": int(u), "rmse": float(e)}
                         for u, e in zip(ids, rmse)]
                if name == "ours":
                    order = {int(u): j for j, u in enumerate(sp.unseen)}
                    unc = post.uncertainty[[order[int(u)] for u in ids]]
                    calib[f"{dim}-dim"] = {"spearman": calibration.rank_correlation(unc, rmse),
                                           "values": unc.tolist(), "error": rmse.tolist()}
            recon[f"{dim}-dim"] = reconstruction(meta, items, users, ratings, sp, seen)
            selected[f"{dim}-dim"] = {"kernel": meta.function_.kernel_name_, "kernel_loo": meta.function_.candidates_,
                                      "nearby_covariance": [meta.function_.nearby_size_, meta.function_.nearby_shrink_],
                                      "readout_ridge": meta.readout_ridge_, "readout_errors": meta.readout_errors_,
                                      "k-NN": {"k": neighbours.k_, "bandwidth": neighbours.h_}}
            bar.update(description=f"MovieLens {dim}-dim")
    return rows, {"timings": timings, "uncertainty": calib, "reconstruction_rmse": recon, "selected": selected}


def reconstruction(meta: MetaModel, items: ml.ItemModel, users: Tensor, ratings: Ratings, sp: ml.Split,
                   seen: Tensor) -> dict[str, float]:
    """RMSE on the zoo users' (``seen``) own public-CF ratings: their uploaded embeddings against
    the decoded ones (the meta-model holding the zoo)."""
    def rmse(emb: Tensor) -> float:
        full = torch.zeros(ratings.num_users, emb.shape[1])
        full[seen] = emb
        return float(ml.user_rmse(items, full, ratings, sp.public_cf() & torch.isin(ratings.user, seen))[1].mean())
    return {"uploaded": rmse(users), "decoded": rmse(meta.reconstruct())}


def run(out: Path, cfg: MovieLensConfig, progress: bool = True) -> dict[str, Any]:
    """Every seed; writes ``results.csv``, ``summary.json``, ``table.md`` and
    ``movielens_rmse.png``."""
    out.mkdir(parents=True, exist_ok=True)
    ratings = load_movielens_100k()
    rows, per_seed = report.over_seeds(cfg.seeds, lambda seed: run_seed(cfg, seed, ratings, progress))
    columns = [f"{d}-dim" for d in cfg.dims]
    paper = {m: {f"{d}-dim": v for d, v in zip(DIMS, vals)} for m, vals in PAPER.items()}
    title = (f"MovieLens 100K: RMSE of unseen users, mean ± std over {cfg.n_unseen} users × "
             f"{len(cfg.seeds)} seeds (0-shot for ours, 1-NN, zoo average)")
    notes = ["cold-start CF: a CF over every rating except the unseen users' non-context ones; "
             "oracle CF: every rating except the held-out test half."]
    result = report.finish(out, rows, "rmse", columns, paper, title,
                           {"config": asdict(cfg), "per_seed": per_seed, "notes": notes},
                           column=column, digits=2, progress=progress)
    plots.grouped_bars(out / "movielens_rmse.png", result["summary"], columns, "RMSE (lower is better)", paper)
    first = per_seed[str(cfg.seeds[0])]["uncertainty"]
    plots.uncertainty_figure(out / "uncertainty.png", {f"MovieLens {d}, ours": (
        torch.tensor(v["values"]), torch.tensor(v["error"]), v["spearman"]) for d, v in first.items()},
        "0-shot RMSE")
    return result
