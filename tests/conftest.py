"""Shared fixtures: seeded, single-threaded, small."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def small_sine_zoo():
    """A small pre-trained sine zoo (each net from its own init), shared across tests."""
    from fedfuse.tasks import sine
    from fedfuse.zoo import ModelZoo

    torch.manual_seed(0)
    tasks = sine.sample_tasks(30, seed=0)
    weights = sine.pretrain(tasks, seed=1, points=100, steps=300)
    return tasks, ModelZoo(sine.SPEC, weights, tasks.tau, [f"c{i}" for i in range(30)])
