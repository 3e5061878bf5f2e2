import pytest
import torch

from fedfuse.errors import ArchitectureError, DescriptorError, FedfuseError, ZooError
from fedfuse.io import save_tensors
from fedfuse.architectures import MLPSpec
from fedfuse.zoo import ModelZoo, check_descriptor

SPEC = MLPSpec((1, 4, 1))


def _records(n=3):
    return [(f"c{i}", torch.randn(SPEC.num_weights), [0.5 * i, 1.0], 10 + i) for i in range(n)]


def test_from_models_and_round_trip(tmp_path):
    zoo = ModelZoo.from_models(SPEC, _records())
    zoo.save(tmp_path / "zoo.safetensors")
    back = ModelZoo.load(tmp_path / "zoo.safetensors")
    assert back.ids == zoo.ids and back.n_examples == [10, 11, 12] and back.spec == SPEC
    assert torch.equal(back.weights, zoo.weights) and torch.equal(back.tau, zoo.tau)
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temp file


def test_mismatched_architecture_is_named():
    recs = _records()
    recs[1] = ("odd", torch.randn(SPEC.num_weights + 3), [0.0, 1.0], 5)
    with pytest.raises(ArchitectureError, match="model 'odd' has 16 weights"):
        ModelZoo.from_models(SPEC, recs)


def test_nan_weights_are_refused():
    recs = _records()
    bad = torch.randn(SPEC.num_weights)
    bad[2] = float("nan")
    recs[2] = ("nanny", bad, [0.0, 1.0], 5)
    with pytest.raises(ZooError, match="non-finite .* \\['nanny'\\]"):
        ModelZoo.from_models(SPEC, recs)


def test_descriptor_length_and_values():
    recs = _records()
    recs[1] = ("short", torch.randn(SPEC.num_weights), [0.0], 5)
    with pytest.raises(DescriptorError, match="length 1; others have 2"):
        ModelZoo.from_models(SPEC, recs)
    with pytest.raises(DescriptorError, match="length 3; this model expects 2"):
        check_descriptor([1.0, 2.0, 3.0], 2)
    with pytest.raises(DescriptorError, match="non-finite"):
        check_descriptor([1.0, float("inf")], 2)
    assert check_descriptor([[1.0, 2.0], [3.0, 4.0]], 2).shape == (2, 2)


def test_duplicates_and_empty():
    recs = _records()
    recs[2] = ("c0", *recs[2][1:])
    with pytest.raises(ZooError, match="duplicate client ids"):
        ModelZoo.from_models(SPEC, recs)
    with pytest.raises(ZooError, match="empty"):
        ModelZoo.from_models(SPEC, [])


def test_foreign_files_are_refused(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(FedfuseError, match="not a readable safetensors"):
        ModelZoo.load(tmp_path / "junk.safetensors")
    save_tensors(tmp_path / "other.safetensors", {"x": torch.zeros(1)}, {"format": "something/1"})
    with pytest.raises(ZooError, match="not a model zoo"):
        ModelZoo.load(tmp_path / "other.safetensors")
