import pytest
import torch

from fedfuse import architectures
from fedfuse.alignment import align_model, apply_perms
from fedfuse.architectures import MLPSpec, ModuleSpec, PermutationGroup, PermutationSpec, VectorSpec
from fedfuse.errors import ArchitectureError


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
    for a, b in zip(spec.unflatten(flat).values(), net.parameters()):
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
    w2 = torch.arange(spec.offsets["fc1.weight"], spec.offsets["fc1.bias"])
    counts = torch.bincount(owned, minlength=spec.num_weights)
    assert (counts[w2] == 2).all()
    others = torch.ones(spec.num_weights, dtype=torch.bool)
    others[w2] = False
    others[spec.offsets["fc2.weight"]:] = False  # output layer weights W3 columns and b3
    assert (counts[others] == 1).all()
    assert spec.unit_index(0).shape == (4, 3 + 1 + 5)


@pytest.mark.parametrize("sizes", [(1, 100, 1), (3, 6, 5, 2)])
def test_permutation_preserves_the_function(sizes):
    spec = MLPSpec(sizes)
    flat = spec.init(1)[0]
    perms = [torch.randperm(h) for h in spec.perm_sizes]
    moved = spec.permute(flat, perms)
    assert not torch.equal(moved, flat)
    x = torch.randn(50, sizes[0])
    torch.testing.assert_close(spec.forward(moved, x), spec.forward(flat, x))


def test_bad_shapes_are_refused_clearly():
    spec = MLPSpec((1, 100, 1))
    with pytest.raises(ArchitectureError, match="has 300 entries; architecture MLP \\[1, 100, 1\\]/relu has 301"):
        spec.unflatten(torch.zeros(300))
    with pytest.raises(ArchitectureError):
        MLPSpec((1, 0, 1))
    with pytest.raises(ArchitectureError, match="unknown activation"):
        MLPSpec((1, 2, 1), activation="gelu-ish")
    assert architectures.from_dict(spec.to_dict()) == spec
    with pytest.raises(ArchitectureError, match="malformed"):
        architectures.from_dict({"layers": [1, 2]})
    with pytest.raises(ArchitectureError, match="at least \\(in, out\\)"):
        MLPSpec((20,))


def test_bare_vector_has_no_symmetry_and_is_a_linear_function():
    spec = VectorSpec(20)
    assert spec.num_weights == 20 and spec.perm_sizes == ()
    assert torch.equal(spec.gather_index([]), torch.arange(20))
    u, x = torch.randn(3, 20), torch.randn(7, 20)
    torch.testing.assert_close(spec.forward(u, x)[..., 0], u @ x.T)
    assert architectures.from_dict(spec.to_dict()) == spec


def test_a_deep_mlp_has_one_permutation_group_per_hidden_layer():
    spec = MLPSpec((4, 6, 5, 3, 2), activation="tanh")
    assert spec.perm_sizes == (6, 5, 3)
    flat = spec.init(1)[0]
    perms = [torch.randperm(h) for h in spec.perm_sizes]
    x = torch.randn(9, 4)
    torch.testing.assert_close(spec.forward(spec.permute(flat, perms), x), spec.forward(flat, x))


CNN = ModuleSpec("small-cnn", {"channels": [4, 6], "hidden": 8})


def test_a_permuted_cnn_computes_the_same_function():
    flat = CNN.init(1, torch.Generator().manual_seed(0))[0]
    perms = [torch.randperm(s, generator=torch.Generator().manual_seed(s)) for s in CNN.perm_sizes]
    moved = CNN.permute(flat, perms)
    assert not torch.equal(moved, flat)
    x = torch.rand(5, 784)
    torch.testing.assert_close(CNN.forward(moved, x), CNN.forward(flat, x), atol=1e-5, rtol=1e-5)
    # batched forward over a zoo equals one model at a time, shared or per-model inputs
    zoo = CNN.init(3)
    torch.testing.assert_close(CNN.forward(zoo, x)[1], CNN.forward(zoo[1], x))
    per_model = torch.rand(3, 2, 784)
    torch.testing.assert_close(CNN.forward(zoo, per_model)[2], CNN.forward(zoo[2], per_model[2]))


def test_a_planted_cnn_permutation_is_recovered():
    import numpy as np

    flat = CNN.init(1, torch.Generator().manual_seed(1))[0]
    planted = [torch.randperm(s) for s in CNN.perm_sizes]
    scrambled = CNN.permute(flat, planted)
    perms = align_model(CNN, scrambled.double().numpy(), flat.double().numpy()[None], np.ones((1, CNN.num_weights)))
    assert torch.equal(CNN.permute(scrambled, [torch.as_tensor(p) for p in perms]), flat)
    batch = torch.stack([scrambled, flat])
    back = apply_perms(CNN, batch, [torch.stack([torch.as_tensor(p), torch.arange(len(p))]) for p in perms])
    assert torch.equal(back, flat.expand(2, -1))


def test_module_architectures_travel_as_dicts_and_bad_declarations_are_refused():
    assert architectures.from_dict(CNN.to_dict()) == CNN and CNN != ModuleSpec("small-cnn", {})
    with pytest.raises(ArchitectureError, match="no module architecture 'rnn'"):
        ModuleSpec("rnn", {})
    with pytest.raises(ArchitectureError, match="cannot be built"):
        ModuleSpec("small-cnn", {"depth": 3})
    spec = dict(CNN.shapes)
    with pytest.raises(ArchitectureError, match="has 5 units but axis 0"):
        PermutationSpec((PermutationGroup("g", 5, (("conv1.weight", 0),)),)).check(spec)
    with pytest.raises(ArchitectureError, match="belongs to two permutations"):
        PermutationSpec((PermutationGroup("a", 4, (("conv1.bias", 0),)),
                         PermutationGroup("b", 4, (("conv1.bias", 0),)))).check(spec)
