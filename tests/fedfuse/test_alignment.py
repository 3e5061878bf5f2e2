import numpy as np
import pytest
import torch

from fedfuse.alignment import align_model, align_zoo, apply_perms, chain_align
from fedfuse.architectures import MLPSpec


@pytest.mark.parametrize("sizes", [(1, 100, 1), (3, 12, 9, 2)])
def test_planted_permutation_is_recovered_exactly(sizes):
    spec = MLPSpec(sizes)
    flat = spec.init(1, torch.Generator().manual_seed(3))[0]
    planted = [torch.randperm(h) for h in spec.perm_sizes]
    scrambled = spec.permute(flat, planted)
    perms = align_model(spec, scrambled.double().numpy(), flat.double().numpy()[None],
                        np.ones((1, spec.num_weights)))
    recovered = spec.permute(scrambled, [torch.as_tensor(p) for p in perms])
    assert torch.equal(recovered, flat)
    x = torch.randn(20, sizes[0])
    torch.testing.assert_close(spec.forward(scrambled, x), spec.forward(flat, x))


def test_align_zoo_matches_per_model_and_any_map():
    spec = MLPSpec((2, 8, 1))
    base = spec.init(1)[0]
    gamma = torch.stack([spec.permute(base, [torch.randperm(8)]) for _ in range(10)])
    mean = base.expand(10, 1, -1)
    ident = [torch.arange(8).repeat(10, 1)]
    calls = []

    def recording_map(fn, items):
        calls.append(len(items))
        return [fn(x) for x in items]

    perms = align_zoo(spec, gamma, mean, torch.ones_like(mean), ident, recording_map, chunk_size=3)
    assert calls == [4]  # 10 models in chunks of 3
    assert torch.equal(apply_perms(spec, gamma, perms), base.expand(10, -1))


def test_chain_alignment_undoes_scrambling_of_copies():
    spec = MLPSpec((1, 30, 1))
    base = spec.init(1)[0]
    noise = 1e-3 * torch.randn(12, spec.num_weights)
    gamma = torch.stack([spec.permute(base, [torch.randperm(30)]) for _ in range(12)]) + noise
    aligned = apply_perms(spec, gamma, chain_align(spec, gamma, torch.randn(12, 2)))
    # every copy ends in one common order (the root's): the copies coincide again
    assert (aligned - aligned[0]).abs().max() < 0.01
    assert (gamma - gamma[0]).abs().max() > 0.1


def test_batched_permutation_equals_per_model_permute():
    spec = MLPSpec((3, 7, 5, 2))
    gamma = spec.init(6)
    perms = [torch.stack([torch.randperm(h) for _ in range(6)]) for h in spec.perm_sizes]
    expected = torch.stack([spec.permute(gamma[i], [p[i] for p in perms]) for i in range(6)])
    assert torch.equal(apply_perms(spec, gamma, perms), expected)
