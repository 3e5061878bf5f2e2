"""MovieLens 100K cold-start users (Table 3): a user's model is its own embedding vector.

300 of the 1,682 items are *context* items: a user's ratings on them are its metadata, embedded
as the descriptor. 800 users are *seen*: a vanilla CF on their ratings of the other 1,382 items
publishes item embeddings; each seen device then fits its own embedding against them (ridge on
its own ratings) and uploads it once. The other 143 users are *unseen*; they are scored on half
of their non-context ratings (the other half only an oracle may use).

Ratings are predicted as ``mu + b_i + u . [v_i, 1]``: the last coordinate of the d-dim user
embedding ``u`` is the user's bias, so a user model is exactly ``d`` numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from fedfuse.architectures import VectorSpec
from fedfuse.datasets import Ratings
from fedfuse.tasks.family import DescriptorSpec, DeviceConfig, LocalData, Recipe, Score, TaskFamily


def spec(dim: int) -> VectorSpec:
    """A user model: a bare vector (no hidden units, hence nothing to align)."""
    return VectorSpec(dim)


@dataclass(frozen=True)
class Split:
    """Who and what is seen: index tensors into users and items, and rating masks."""

    context: Tensor          # (300,) context item ids
    seen: Tensor             # (800,) seen user ids
    unseen: Tensor           # (143,) unseen user ids
    is_context: Tensor       # (R,) rating is on a context item
    is_seen: Tensor          # (R,) rating is by a seen user
    is_test: Tensor          # (R,) held-out non-context rating of an unseen user

    def public_cf(self) -> Tensor:
        """Ratings the public CF and the seen devices train on."""
        return self.is_seen & ~self.is_context

    def cold_start_cf(self) -> Tensor:
        """All but the unseen users' non-context ratings: a plain CF for a new user who has
        rated only context items."""
        return ~(~self.is_seen & ~self.is_context)

    def oracle_cf(self) -> Tensor:
        """Everything except the held-out test ratings."""
        return ~self.is_test


def split(ratings: Ratings, seed: int, n_context: int = 300, n_unseen: int = 143,
          test_fraction: float = 0.5) -> Split:
    gen = torch.Generator().manual_seed(seed)
    context = torch.randperm(ratings.num_items, generator=gen)[:n_context].sort().values
    users = torch.randperm(ratings.num_users, generator=gen)
    unseen, seen = users[:n_unseen].sort().values, users[n_unseen:].sort().values
    is_context = torch.isin(ratings.item, context)
    is_seen = torch.isin(ratings.user, seen)
    candidates = ~is_seen & ~is_context
    is_test = candidates & (torch.rand(len(ratings.rating), generator=gen) < test_fraction)
    return Split(context, seen, unseen, is_context, is_seen, is_test)


def context_matrix(ratings: Ratings, sp: Split) -> tuple[Tensor, Tensor]:
    """``(num_users, n_context)`` each: the context ratings centered at their mean over every
    user (a public constant; 0 where a user rated nothing) and which context items each user
    rated (0/1)."""
    m = sp.is_context
    col = torch.full((ratings.num_items,), -1, dtype=torch.long)
    col[sp.context] = torch.arange(len(sp.context))
    mu = ratings.rating[m].mean()
    centered = torch.zeros(ratings.num_users, len(sp.context))
    rated = torch.zeros(ratings.num_users, len(sp.context))
    centered[ratings.user[m], col[ratings.item[m]]] = ratings.rating[m] - mu
    rated[ratings.user[m], col[ratings.item[m]]] = 1.0
    return centered, rated


# the descriptor's principal components of the context ratings and of which context items were
# rated: the three bench zoos' mean leave-one-out error picks (10, 20) of (10, 0/5/10/20/40) and
# (20, 20) (simulations/RESULTS.md, ablations); a family constant, since a device must know what to send
RATING_DIM, RATED_DIM = 10, 20


def descriptors(ratings: Ratings, sp: Split, rating_dim: int = RATING_DIM, rated_dim: int = RATED_DIM) -> Tensor:
    """Each user's descriptor from its context ratings only: its mean centered rating, its
    number of ratings (log), the top ``rating_dim`` principal components of the centered rating
    matrix and the top ``rated_dim`` of *which* context items it rated (0/1: what a user chose
    to rate tells its taste apart from how it rated, as implicit feedback does in CF); both
    bases are fitted on the seen users (what the server holds)."""
    c, was_rated = context_matrix(ratings, sp)
    rated = was_rated.sum(1)
    mean = c.sum(1) / rated.clamp_min(1)
    return torch.cat([mean[:, None], torch.log1p(rated)[:, None],
                      _principal_scores(c, sp.seen, rating_dim), _principal_scores(was_rated, sp.seen, rated_dim)], dim=1)


def _principal_scores(m: Tensor, fitted_on: Tensor, k: int) -> Tensor:
    """Every row's scores on the top ``k`` principal axes of the rows ``fitted_on``."""
    if not 0 <= k <= min(len(fitted_on), m.shape[1]):
        raise ValueError(f"{k} principal components asked of {len(fitted_on)} rows of {m.shape[1]} entries")
    center = m[fitted_on].mean(0)
    _, _, v = torch.linalg.svd(m[fitted_on] - center, full_matrices=False)
    return (m - center) @ v[:k].T


def ridge(rows: Tensor, feats: Tensor, target: Tensor, n_rows: int, reg: float,
          chunk: int = 20000) -> Tensor:
    """Per row r: ``argmin_w sum_{j: rows_j = r} (feats_j . w - target_j)^2 + reg |w|^2``,
    all rows at once (Gram matrices accumulated in chunks, one batched solve)."""
    p = feats.shape[1]
    gram = torch.zeros(n_rows, p, p, dtype=torch.float64)
    rhs = torch.zeros(n_rows, p, dtype=torch.float64)
    for s in range(0, len(rows), chunk):
        f = feats[s : s + chunk].double()
        gram.index_add_(0, rows[s : s + chunk], f[:, :, None] * f[:, None, :])
        rhs.index_add_(0, rows[s : s + chunk], f * target[s : s + chunk, None].double())
    gram += reg * torch.eye(p, dtype=torch.float64)
    return torch.linalg.solve(gram, rhs).float()


@dataclass(frozen=True)
class ItemModel:
    """The public side of the CF: global mean, item biases and item embeddings."""

    mu: float
    bias: Tensor     # (num_items,)
    embed: Tensor    # (num_items, dim - 1)

    def features(self, items: Tensor) -> Tensor:
        return torch.cat([self.embed[items], torch.ones(len(items), 1)], dim=1)

    def predict(self, users: Tensor, items: Tensor) -> Tensor:
        """Predicted ratings for embeddings ``users`` ``(R, d)`` on ``items`` ``(R,)``."""
        return self.mu + self.bias[items] + (users * self.features(items)).sum(1)

    def fit_users(self, ratings: Ratings, mask: Tensor, reg: float) -> Tensor:
        """Every user's embedding from its own ratings in ``mask`` (a device's local training);
        a user without any gets zeros."""
        u, i, r = ratings.user[mask], ratings.item[mask], ratings.rating[mask]
        return ridge(u, self.features(i), r - self.mu - self.bias[i], ratings.num_users, reg)


def als(ratings: Ratings, mask: Tensor, dim: int, reg: float = 5.0, iters: int = 15,
        seed: int = 0) -> tuple[ItemModel, Tensor]:
    """Alternating ridge regressions on the ratings in ``mask`` (a vanilla biased CF)."""
    gen = torch.Generator().manual_seed(seed)
    u, i, r = ratings.user[mask], ratings.item[mask], ratings.rating[mask]
    mu = float(r.mean())
    items = ItemModel(mu, torch.zeros(ratings.num_items), 0.1 * torch.randn(ratings.num_items, dim - 1, generator=gen))
    for _ in range(iters):
        users = items.fit_users(ratings, mask, reg)
        g = torch.cat([users[u, : dim - 1], torch.ones(len(u), 1)], dim=1)
        sol = ridge(i, g, r - mu - users[u, dim - 1], ratings.num_items, reg)
        items = ItemModel(mu, sol[:, -1], sol[:, :-1])
    return items, items.fit_users(ratings, mask, reg)


def user_rmse(items: ItemModel, users: Tensor, ratings: Ratings, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per-user RMSE over the ratings in ``mask``: ``(user ids, rmse)``; ``users`` is indexed by
    user id, ``(num_users, d)``."""
    u, i, r = ratings.user[mask], ratings.item[mask], ratings.rating[mask]
    err = (items.predict(users[u], i) - r) ** 2
    ids, inv = torch.unique(u, return_inverse=True)
    sse = torch.zeros(len(ids)).index_add_(0, inv, err)
    cnt = torch.zeros(len(ids)).index_add_(0, inv, torch.ones_like(err))
    return ids, (sse / cnt).sqrt()


@dataclass(frozen=True)
class PublicSide:
    """What every party may know in the simulation: the split, the descriptor basis (fitted on
    the seen users' context ratings) and the public item model (a CF over seen users)."""

    ratings: Ratings
    split: Split
    tau: Tensor  # (num_users, 2 + RATING_DIM + RATED_DIM) every user's descriptor
    items: ItemModel


@lru_cache(maxsize=4)
def public_side(seed: int, dim: int, reg: float = 10.0, iters: int = 15) -> PublicSide:
    from fedfuse.datasets import load_movielens_100k

    ratings = load_movielens_100k()
    sp = split(ratings, seed)
    items, _ = als(ratings, sp.public_cf(), dim, reg, iters, seed)
    return PublicSide(ratings, sp, descriptors(ratings, sp), items)


class MovieLensFamily(TaskFamily):
    """A user's recommendation model: its own embedding against the public item embeddings,
    fitted on its own ratings; the descriptor embeds its ratings of 300 context items. As a
    function, an embedding predicts the user's ratings (less the public mean and item biases):
    a device's targets are those residual ratings ``(k, 1)``."""

    name = "movielens"
    dim = 20
    reg = 10.0
    arch = VectorSpec(dim)
    descriptor = DescriptorSpec(("mean context rating", "log context count",
                                 *(f"context PC{i + 1}" for i in range(RATING_DIM)),
                                 *(f"rated PC{i + 1}" for i in range(RATED_DIM))),
                                (-4.0, 0.0, *(-1e3,) * (RATING_DIM + RATED_DIM)),
                                (4.0, 6.0, *(1e3,) * (RATING_DIM + RATED_DIM)))
    loss = "mse"
    score = Score("RMSE", higher_is_better=False, digits=3)
    recipe = Recipe(train_steps=300, train_lr=5e-2, finetune_steps=300, finetune_lr=5e-2)
    meta_settings = {"hidden": (64,)}

    def _examples(self, side: PublicSide, user: int, mask: Tensor) -> tuple[Tensor, Tensor]:
        r = side.ratings
        m = mask & (r.user == user)
        i = r.item[m]
        return side.items.features(i), (r.rating[m] - side.items.mu - side.items.bias[i])[:, None]

    def simulated_device(self, index: int, cfg: DeviceConfig) -> LocalData:
        side = public_side(cfg.seed, self.dim, self.reg)
        sp = side.split
        if index < cfg.num_clients:
            user = int(sp.seen[index % len(sp.seen)])
            x, y = self._examples(side, user, sp.public_cf())
            return LocalData(f"user-{user:04d}", "zoo", side.tau[user].tolist(), x, y,
                             torch.zeros(0, self.dim), torch.zeros(0, 1))
        user = int(sp.unseen[(index - cfg.num_clients) % len(sp.unseen)])
        x, y = self._examples(side, user, ~sp.is_seen & ~sp.is_context & ~sp.is_test)
        x_eval, y_eval = self._examples(side, user, sp.is_test)
        return LocalData(f"new-user-{user:04d}", "new", side.tau[user].tolist(), x[: cfg.shots], y[: cfg.shots],
                         x_eval, y_eval)

    def train(self, data: LocalData, seed: int, steps: int | None = None) -> Tensor:
        """The device's own ridge fit against the public item features (the ALS user step)."""
        rows = torch.zeros(len(data.y), dtype=torch.long)
        return ridge(rows, data.x, data.y[:, 0], 1, self.reg)[0]

    def evaluate(self, weights: Tensor, data: LocalData) -> Tensor:
        """RMSE of the predicted ratings on the held-back ratings."""
        with torch.no_grad():
            pred = self.arch.forward(weights, data.x_eval)
        return ((pred - data.y_eval) ** 2).mean((-1, -2)).sqrt()

    def probe(self, seed: int = 0) -> Tensor:
        """Every item's public features: a user model's function is its ratings of them."""
        side = public_side(seed, self.dim, self.reg)
        return side.items.features(torch.arange(side.ratings.num_items))
