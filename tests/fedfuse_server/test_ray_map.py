import pytest
import torch

from fedfuse.meta_model import MetaModel
from fedfuse.parallel import serial_map
from fedfuse_server.ray_map import RayMap


def test_small_batches_stay_in_process():
    import ray

    assert not ray.is_initialized()
    pmap = RayMap()
    calls = pmap(lambda x: x * 2, list(range(31)))
    assert calls == [2 * x for x in range(31)]
    assert not ray.is_initialized() and pmap._task_cpus is None  # below the threshold: no Ray started


@pytest.mark.slow
def test_fit_with_ray_fan_out_equals_the_serial_fit(small_sine_zoo):
    import ray

    _, zoo = small_sine_zoo
    settings = dict(hidden=(32,), max_rounds=2, steps_per_round=30, code_dim=4, base_dim=4,
                    chunk_size=4, seed=3)
    probe = torch.linspace(-5, 5, 16)[:, None]
    serial = MetaModel(pmap=serial_map, **settings).fit(zoo, probe=probe)
    pmap = RayMap(address="", force=True)
    try:
        parallel = MetaModel(pmap=pmap, **settings).fit(zoo, probe=probe)
        assert ray.is_initialized() and pmap._task_cpus == 1
    finally:
        ray.shutdown()
    for a, b in zip(serial.perms_, parallel.perms_):
        assert torch.equal(a, b)
    tau = torch.tensor([[1.0, 0.4], [3.0, 2.0]])
    assert torch.equal(serial.personalize(tau).mean, parallel.personalize(tau).mean)
