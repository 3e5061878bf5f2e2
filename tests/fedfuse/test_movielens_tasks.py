import pytest
import torch

from fedfuse.datasets import Ratings, load_movielens_100k
from fedfuse.tasks import movielens as ml


@pytest.fixture(scope="module")
def ratings():
    return load_movielens_100k()


def test_split_follows_the_paper(ratings):
    sp = ml.split(ratings, seed=0)
    assert len(sp.context) == 300 and len(sp.seen) == 800 and len(sp.unseen) == 143
    assert not set(sp.seen.tolist()) & set(sp.unseen.tolist())
    # test ratings: only unseen users' non-context ratings, about half of them
    assert not (sp.is_test & (sp.is_seen | sp.is_context)).any()
    candidates = int((~sp.is_seen & ~sp.is_context).sum())
    assert 0.4 < int(sp.is_test.sum()) / candidates < 0.6
    # the public CF never sees a context rating or an unseen user; the oracle never a test one
    pub = sp.public_cf()
    assert not (pub & (sp.is_context | ~sp.is_seen)).any()
    assert not (sp.oracle_cf() & sp.is_test).any() and not (sp.cold_start_cf() & sp.is_test).any()


def test_descriptor_depends_only_on_context_ratings(ratings):
    sp = ml.split(ratings, seed=0)
    tau = ml.descriptors(ratings, sp)
    assert tau.shape == (ratings.num_users, 2 + ml.RATING_DIM + ml.RATED_DIM) and torch.isfinite(tau).all()
    assert ml.MovieLensFamily.descriptor.length == tau.shape[1]
    rating_part, rated_part = slice(2, 2 + ml.RATING_DIM), slice(2 + ml.RATING_DIM, None)

    def with_ratings(rating: torch.Tensor) -> Ratings:
        return Ratings(ratings.user, ratings.item, rating, ratings.num_users, ratings.num_items)

    changed = ratings.rating.clone()
    changed[~sp.is_context] = 6 - changed[~sp.is_context]  # flip every non-context rating
    assert torch.equal(ml.descriptors(with_ratings(changed), sp), tau)
    changed[sp.is_context] = ratings.rating[sp.is_context] % 5 + 1  # other context ratings, same items
    flipped = ml.descriptors(with_ratings(changed), sp)
    # the rating components move; the components of which items were rated do not
    assert not torch.allclose(flipped[:, rating_part].abs(), tau[:, rating_part].abs(), atol=1e-2)
    assert torch.equal(flipped[:, rated_part], tau[:, rated_part])


def test_descriptor_bases_are_the_seen_users_and_a_new_user_is_scored_on_them(ratings):
    sp = ml.split(ratings, seed=0)
    tau = ml.descriptors(ratings, sp)
    # an unseen user rating one more context item: its own rated components move, no one else's
    # do (the bases are fitted on the seen users alone; the ratings' centering, the mean of every
    # context rating, moves by a hair)
    user, item = int(sp.unseen[0]), int(sp.context[-1])
    rated_before = ((ratings.user == user) & (ratings.item == item)).any()
    assert not rated_before
    extra = Ratings(torch.cat([ratings.user, torch.tensor([user])]), torch.cat([ratings.item, torch.tensor([item])]),
                    torch.cat([ratings.rating, torch.tensor([3.0])]), ratings.num_users, ratings.num_items)
    other = ml.descriptors(extra, ml.split(extra, seed=0))
    assert not torch.equal(other[user, 2 + ml.RATING_DIM:], tau[user, 2 + ml.RATING_DIM:])
    others = torch.arange(ratings.num_users) != user
    assert torch.equal(other[others, 2 + ml.RATING_DIM:], tau[others, 2 + ml.RATING_DIM:])
    assert torch.allclose(other[others], tau[others], atol=1e-2)
    with pytest.raises(ValueError, match="principal components"):
        ml.descriptors(ratings, sp, rated_dim=301)


def test_ridge_matches_a_direct_solve_per_row():
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 5, (200,), generator=gen)
    feats, target = torch.randn(200, 3, generator=gen), torch.randn(200, generator=gen)
    sol = ml.ridge(rows, feats, target, 6, reg=0.5, chunk=37)
    for r in range(5):
        f, t = feats[rows == r].double(), target[rows == r].double()
        ref = torch.linalg.solve(f.T @ f + 0.5 * torch.eye(3, dtype=torch.float64), f.T @ t)
        assert torch.allclose(sol[r].double(), ref, atol=1e-5)
    assert torch.equal(sol[5], torch.zeros(3))  # a row without data stays at zero


def test_cf_learns_and_user_rmse_is_per_user(ratings):
    sp = ml.split(ratings, seed=0)
    items, users = ml.als(ratings, sp.oracle_cf(), dim=10, iters=4)
    ids, rmse = ml.user_rmse(items, users, ratings, sp.is_test)
    assert set(ids.tolist()) <= set(sp.unseen.tolist()) and len(ids) > 130
    # item biases alone (a zero user embedding) are worse than the learned users
    _, bias_only = ml.user_rmse(items, torch.zeros_like(users), ratings, sp.is_test)
    assert rmse.mean() < bias_only.mean() and rmse.mean() < 1.1
    # per-user RMSE by hand for one user
    u = int(ids[0])
    m = sp.is_test & (ratings.user == u)
    pred = items.predict(users[ratings.user[m]], ratings.item[m])
    assert torch.isclose(rmse[0], ((pred - ratings.rating[m]) ** 2).mean().sqrt())
