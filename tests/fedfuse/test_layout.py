import pytest
import torch

from fedfuse.errors import ArchitectureError
from fedfuse.layout import MLPSpec


@pytest.mark.parametrize("sizes", [(1, 100, 1), (3, 7, 5, 2), (4, 2)])
def test_flatten_round_trip_and_forward_matches_torch(sizes):
    spec = MLPSpec(sizes)
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    net = torch.nn.Sequential(*layers[:-1])
    flat = spec.flatten([p.detach() for p in net.parameters()])
    assert flat.shape == (spec.num_weights,)
    assert spec.num_weights == sum(p.numel() for p in net.parameters())
    for a, b in zip(spec.unflatten(flat), net.parameters()):
        assert torch.equal(a, b)
    x = torch.randn(11, sizes[0])
    torch.testing.assert_close(spec.forward(flat, x), net(x))
    batch = torch.stack([flat, 2 * flat])
    assert spec.forward(batch, x).shape == (2, 11, sizes[-1])


def test_sine_net_has_301_weights():
    assert MLPSpec((1, 100, 1)).num_weights == 301


def test_unit_index_partitions_the_hidden_weights():
    spec = MLPSpec((3, 4, 5, 2))
    owned = torch.cat([spec.unit_index(0).flatten(), spec.unit_index(1).flatten()])
    # W2 entries belong to one unit of each layer; every other hidden weight to exactly one unit
    w2 = torch.arange(spec.offsets[2], spec.offsets[3])
    counts = torch.bincount(owned, minlength=spec.num_weights)
    assert (counts[w2] == 2).all()
    others = torch.ones(spec.num_weights, dtype=torch.bool)
    others[w2] = False
    others[spec.offsets[4]:] = False  # output layer weights W3 columns and b3
    assert (counts[others] == 1).all()
    assert spec.unit_index(0).shape == (4, 3 + 1 + 5)


@pytest.mark.parametrize("sizes", [(1, 100, 1), (3, 6, 5, 2)])
def test_permutation_preserves_the_function(sizes):
    spec = MLPSpec(sizes)
    flat = spec.init(1)[0]
    perms = [torch.randperm(h) for h in spec.hidden_sizes]
    moved = spec.permute(flat, perms)
    assert not torch.equal(moved, flat)
    x = torch.randn(50, sizes[0])
    torch.testing.assert_close(spec.forward(moved, x), spec.forward(flat, x))


def test_bad_shapes_are_refused_clearly():
    spec = MLPSpec((1, 100, 1))
    with pytest.raises(ArchitectureError, match="has 300 entries; architecture \\[1, 100, 1\\] has 301"):
        spec.unflatten(torch.zeros(300))
    with pytest.raises(ArchitectureError):
        MLPSpec((1, 0, 1))
    with pytest.raises(ArchitectureError, match="unknown activation"):
        MLPSpec((1, 2, 1), activation="gelu-ish")
    assert MLPSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ArchitectureError, match="malformed"):
        MLPSpec.from_dict({"layers": [1, 2]})


def test_bare_vector_has_no_symmetry():
    spec = MLPSpec((20,), activation="none")
    assert spec.num_weights == 20 and spec.num_hidden_layers == 0
    assert torch.equal(spec.gather_index([]), torch.arange(20))
