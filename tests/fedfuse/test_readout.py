import pytest
import torch

from fedfuse.architectures import MLPSpec, VectorSpec
from fedfuse.readout import design, get_readout, held_out_outputs, set_readout, solve_readout


def test_outputs_are_the_design_times_the_readout():
    spec = MLPSpec((3, 6, 5, 2))
    w, x = spec.init(4, torch.Generator().manual_seed(0)), torch.randn(9, 3)
    out = design(spec, w, x) @ get_readout(spec, w).double()
    torch.testing.assert_close(out.float(), spec.forward(w, x), atol=1e-5, rtol=1e-5)
    assert torch.equal(get_readout(spec, set_readout(spec, w, get_readout(spec, w) + 1)), get_readout(spec, w) + 1)
    # only the readout entries move
    moved = set_readout(spec, w, torch.zeros_like(get_readout(spec, w))) != w
    assert moved.any(1).all() and moved.sum(1).max() <= spec.readout_index.numel()


def test_solve_readout_reproduces_a_reachable_function_and_falls_back_to_the_current_readout():
    spec = MLPSpec((1, 20, 2))
    gen = torch.Generator().manual_seed(1)
    base, other = spec.init(1, gen), spec.init(1, gen)
    probe = torch.linspace(-2, 2, 50)[:, None]
    other = set_readout(spec, base, get_readout(spec, other))  # same features, another readout
    target = spec.forward(other, probe).double()
    readout, _ = solve_readout(spec, base, probe, target, ridge=1e-9)
    solved = set_readout(spec, base, readout)
    torch.testing.assert_close(spec.forward(solved, probe), spec.forward(other, probe), atol=1e-3, rtol=1e-3)
    kept, _ = solve_readout(spec, base, probe, target, ridge=1e6)  # all ridge: the current readout stays
    torch.testing.assert_close(kept.float(), get_readout(spec, base), atol=1e-3, rtol=1e-3)


def test_solve_readout_is_the_ridge_solution_and_its_map_carries_a_change_of_target():
    spec = MLPSpec((3, 7, 2))
    gen = torch.Generator().manual_seed(2)
    base, probe = spec.init(3, gen), torch.randn(11, 3, generator=gen)
    target = torch.randn(3, 11, 2, generator=gen, dtype=torch.float64)
    ridge = 0.05
    readout, a = solve_readout(spec, base, probe, target, ridge)
    phi, current = design(spec, base, probe), get_readout(spec, base).double()
    gram = phi.transpose(1, 2) @ phi
    lam = ridge * torch.diagonal(gram, dim1=1, dim2=2).mean(1)[:, None, None]
    # the minimizer of |phi r - target|^2 + lam |r - current|^2, from its normal equations
    expected = torch.linalg.solve(gram + lam * torch.eye(8, dtype=torch.float64),
                                  phi.transpose(1, 2) @ target + lam * current)
    torch.testing.assert_close(readout, expected)
    shift = torch.randn(3, 11, 2, generator=gen, dtype=torch.float64)
    moved, _ = solve_readout(spec, base, probe, target + shift, ridge)
    torch.testing.assert_close(moved - readout, a @ shift)


# fewer or more features than inputs; with more and a tiny ridge each input's leverage is near 1,
# and the closed form divides the residual's rounding by 1 - leverage (about 1e-6 here)
@pytest.mark.parametrize("hidden, ridge, rtol", [(9, 1e-3, 1e-7), (30, 1e-6, 1e-4)])
def test_held_out_outputs_are_the_readouts_solved_without_each_probe_input(hidden, ridge, rtol):
    """Brute force: the readout solved again on the other probe inputs, with the same ridge
    strength (solve_readout scales the ridge by the features' mean energy, so it is rescaled)."""
    spec = MLPSpec((2, hidden, 3))
    gen = torch.Generator().manual_seed(3)
    base, probe = spec.init(2, gen), torch.randn(12, 2, generator=gen)
    target = torch.randn(2, 12, 3, generator=gen, dtype=torch.float64)
    got = held_out_outputs(spec, base, probe, target, ridge)
    energy = lambda x: torch.diagonal(design(spec, base, x).transpose(1, 2) @ design(spec, base, x),  # noqa: E731
                                      dim1=1, dim2=2).mean(1)
    for i in range(12):
        rest = torch.arange(12) != i
        for j in range(2):  # each network's own ridge strength, rescaled to the other inputs
            r = ridge * float(energy(probe)[j] / energy(probe[rest])[j])
            readout, _ = solve_readout(spec, base[j:j + 1], probe[rest], target[j:j + 1, rest], r)
            expected = design(spec, base[j:j + 1], probe[i:i + 1]) @ readout
            torch.testing.assert_close(got[j:j + 1, i:i + 1], expected, rtol=rtol, atol=rtol)
    # with every input seen the outputs would be the solved fit; left out they are worse
    solved = design(spec, base, probe) @ solve_readout(spec, base, probe, target, ridge)[0]
    assert (got - target).norm() > (solved - target).norm()


def test_a_bare_vector_is_all_readout():
    spec = VectorSpec(5)
    w = torch.randn(2, 5)
    assert spec.readout_index.shape == (5, 1)
    assert torch.equal(get_readout(spec, w)[..., 0], w)
