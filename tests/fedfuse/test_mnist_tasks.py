import torch

from fedfuse import datasets
from fedfuse.tasks import mnist


def test_task_sampling_follows_the_paper():
    train, test = mnist.sample_tasks(seed=0)
    by_k = lambda ts, k: [t for t in ts if len(t.digits) == k]  # noqa: E731
    assert [len(by_k(train, k)) for k in mnist.KS] == [40, 40, 40, 40]
    assert [len(by_k(test, k)) for k in mnist.KS] == [5, 15, 15, 15]  # 45 pairs: 40 + 5
    assert not {t.digits for t in train} & {t.digits for t in test}
    assert train[0].tau.sum() == len(train[0].digits) and train[0].tau.shape == (10,)
    assert mnist.sample_tasks(seed=0) == mnist.sample_tasks(seed=0)


def test_pretrained_devices_beat_chance_on_their_own_digits():
    x, y = datasets.load_mnist("test")  # small and fast; the benchmark uses the train split
    tasks = [mnist.DigitTask((0, 1)), mnist.DigitTask((3, 5, 8))]
    w = mnist.pretrain(tasks, x[:5000], y[:5000], seed=0, per_task=300, steps=60)
    acc = mnist.accuracy(w, tasks, x[5000:], y[5000:])
    assert acc[0] > 0.9 and acc[1] > 0.6
    xs, ys = mnist.shots_per_digit(tasks[1], x, y, k=2, seed=1)
    assert xs.shape == (6, 784) and torch.bincount(ys, minlength=10)[[3, 5, 8]].tolist() == [2, 2, 2]
