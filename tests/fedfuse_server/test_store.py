import pytest
import torch

from fedfuse.errors import FedfuseError, ZooError
from fedfuse.architectures import MLPSpec
from fedfuse.wire import Upload
from fedfuse_server.store import ModelStore

SPEC = MLPSpec((1, 5, 1))


def _upload(cid: str, scale: float = 1.0) -> Upload:
    return Upload(cid, SPEC, scale * torch.ones(SPEC.num_weights), [scale, 0.5], 10)


def test_reupload_replaces_and_a_new_instance_finds_everything(tmp_path):
    store = ModelStore(tmp_path)
    store.put(_upload("a"))
    store.put(_upload("b"))
    store.put(_upload("a", 2.0))
    again = ModelStore(tmp_path)
    zoo = again.zoo()
    assert zoo.ids == ["a", "b"]
    assert torch.equal(zoo.weights[0], 2.0 * torch.ones(SPEC.num_weights))
    assert len(list((tmp_path / "uploads").glob("*.safetensors"))) == 2


def test_empty_store_and_missing_model_say_what_to_run(tmp_path):
    store = ModelStore(tmp_path)
    with pytest.raises(ZooError, match="run the collect phase first"):
        store.zoo()
    with pytest.raises(FedfuseError, match="run the fit phase first"):
        store.load_meta_model()


def test_tampered_file_is_detected(tmp_path):
    store = ModelStore(tmp_path)
    store.put(_upload("a"))
    path = next((tmp_path / "uploads").glob("*.safetensors"))
    path.write_bytes(path.read_bytes()[:-4] + b"\x00\x00\x00\x00")
    with pytest.raises(FedfuseError, match="does not match its index entry"):
        store.zoo()


def test_metrics_are_keyed_by_client_and_run(tmp_path):
    store = ModelStore(tmp_path)
    store.record_metrics("x", "1", {"score-0shot": 0.5})
    store.record_metrics("x", "1", {"score-0shot": 0.4})
    store.record_metrics("x", "2", {"score-0shot": 0.3})
    assert store.metrics("1") == {"x": {"score-0shot": 0.4}}
    assert len(store.metrics()) == 1  # keyed by client: the latest run's entry
