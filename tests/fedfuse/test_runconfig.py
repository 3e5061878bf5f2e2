import tomllib
from pathlib import Path

import pytest

from fedfuse.errors import FedfuseError
from fedfuse.runconfig import RunConfig


def test_pyproject_run_config_equals_the_defaults():
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["config"] == RunConfig().to_run_config()


def test_overrides_types_and_unknown_keys():
    cfg = RunConfig.from_run_config({"num-clients": "7", "phase": "fit"}, shots=3)
    assert cfg.num_clients == 7 and cfg.shots == 3 and cfg.phases == ["fit"]
    with pytest.raises(FedfuseError, match="unknown run-config key 'num-client'"):
        RunConfig.from_run_config({"num-client": 3})
    with pytest.raises(FedfuseError, match="must be int"):
        RunConfig.from_run_config({"shots": "many"})
    assert RunConfig.from_run_config({"distill": True}).distill is True
    with pytest.raises(FedfuseError, match="must be true or false"):  # bool("false") would be True
        RunConfig.from_run_config({"distill": "false"})
    assert RunConfig.from_run_config({"distill-steps": 300}).distill_steps == 300 and RunConfig().distill_steps == -1
    with pytest.raises(FedfuseError, match="distill-steps=-2"):
        RunConfig(distill_steps=-2)
    with pytest.raises(FedfuseError, match="comma-separated subset"):
        RunConfig(phase="collect,train")
