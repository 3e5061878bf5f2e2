import torch

from fedfuse.architectures import MLPSpec, VectorSpec
from fedfuse.readout import design, get_readout, readout_map, set_readout


def test_outputs_are_the_design_times_the_readout():
    spec = MLPSpec((3, 6, 5, 2))
    w, x = spec.init(4, torch.Generator().manual_seed(0)), torch.randn(9, 3)
    out = design(spec, w, x) @ get_readout(spec, w).double()
    torch.testing.assert_close(out.float(), spec.forward(w, x), atol=1e-5, rtol=1e-5)
    assert torch.equal(get_readout(spec, set_readout(spec, w, get_readout(spec, w) + 1)), get_readout(spec, w) + 1)
    # only the readout entries move
    moved = set_readout(spec, w, torch.zeros_like(get_readout(spec, w))) != w
    assert moved.any(1).all() and moved.sum(1).max() <= spec.readout_index.numel()


def test_readout_map_reproduces_a_reachable_function_and_falls_back_to_the_current_readout():
    spec = MLPSpec((1, 20, 2))
    gen = torch.Generator().manual_seed(1)
    base, other = spec.init(1, gen), spec.init(1, gen)
    probe = torch.linspace(-2, 2, 50)[:, None]
    other = set_readout(spec, base, get_readout(spec, other))  # same features, another readout
    target = spec.forward(other, probe).double()
    a, b = readout_map(spec, base, probe, ridge=1e-9)
    solved = set_readout(spec, base, a @ target + b @ get_readout(spec, base).double())
    torch.testing.assert_close(spec.forward(solved, probe), spec.forward(other, probe), atol=1e-3, rtol=1e-3)
    a, b = readout_map(spec, base, probe, ridge=1e6)  # all ridge: the current readout stays
    kept = a @ target + b @ get_readout(spec, base).double()
    torch.testing.assert_close(kept.float(), get_readout(spec, base), atol=1e-3, rtol=1e-3)


def test_a_bare_vector_is_all_readout():
    spec = VectorSpec(5)
    w = torch.randn(2, 5)
    assert spec.readout_index.shape == (5, 1)
    assert torch.equal(get_readout(spec, w)[..., 0], w)
