import dataclasses

import torch

from fedfuse import wire
from fedfuse.adaptation import RULES, Acceptance, condition_readout
from fedfuse.posterior import ReadoutGaussian
from fedfuse.readout import get_readout, set_readout
from fedfuse.tasks import LocalData, TaskFamily, get_family
from fedfuse_client.local import adapt


def _devices(n: int = 12) -> tuple[TaskFamily, list[wire.Initializer], list[LocalData]]:
    """Sine devices whose readout prior contains their truth's deviation, with noisy shots: two
    different rules decide some of them differently."""
    family = get_family("sine")
    spec = family.arch
    gen = torch.Generator().manual_seed(0)
    base = spec.init(n, gen)
    loc = get_readout(spec, base).reshape(n, -1)
    direction = torch.randn(n, loc.shape[1], 1, generator=gen)
    truth = set_readout(spec, base, (loc + 0.5 * direction[..., 0]).reshape(n, -1, 1))
    x = torch.rand(n, 12, 1, generator=gen) * 10 - 5
    y = spec.forward(truth, x) + 0.5 * torch.randn(n, 12, 1, generator=gen)
    diag = torch.full_like(loc, 1e-4)
    priors = [ReadoutGaussian(loc[i : i + 1], direction[i : i + 1], diag[i : i + 1]) for i in range(n)]
    inits = [wire.Initializer(base[i], priors[i], 0.0, 0.0) for i in range(n)]
    data = [LocalData(f"new-{i}", "new", [1.0, 0.0], x[i], y[i], x[i], y[i]) for i in range(n)]
    return family, inits, data


def test_a_device_adapts_by_the_rule_of_the_path_that_made_its_initializer(monkeypatch):
    # both squared-error paths use one rule today: give the distilled path another to tell them apart
    monkeypatch.setitem(RULES, ("mse", True), Acceptance(0.0))
    family, inits, data = _devices()
    differ = 0
    for init, d in zip(inits, data):
        adapted = [adapt(family, dataclasses.replace(init, distilled=distilled), d) for distilled in (False, True)]
        for distilled, mine in zip((False, True), adapted):
            expected = condition_readout(family.arch, init.weights[None], init.readout, d.x[None], d.y[None], "mse",
                                         rule=RULES["mse", distilled])
            assert torch.equal(mine, expected)
        differ += not torch.equal(*adapted)
    assert differ  # the two paths' rules are not the same rule here
