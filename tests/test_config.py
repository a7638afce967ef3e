"""Config loading, override checking and the JSON round trip."""

import subprocess
import sys
from pathlib import Path

import pytest

from medvlp_jax import config as config_lib

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.py") if p.stem != "replay")


def test_unknown_key_names_the_closest_valid_one():
    config = config_lib.base_config()
    with pytest.raises(config_lib.ConfigError, match=r"--config\.data\.batch_size"):
        config_lib.check_overrides(config, ["--config.data.batchsize=8"])


def test_wrong_type_names_field_and_type():
    config = config_lib.base_config()
    with pytest.raises(config_lib.ConfigError, match=r"train\.num_steps=ten: expected an int"):
        config_lib.check_overrides(config, ["--config.train.num_steps=ten"])
    config_lib.check_overrides(config, ["--config.train.num_steps=10", "--workdir=/tmp/x"])


def test_choice_fields_are_checked():
    config = config_lib.base_config()
    config.optim.name = "adam"
    with pytest.raises(config_lib.ConfigError, match=r"optim\.name='adam'"):
        config_lib.check_choices(config)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_and_tiny_preset_loads(path):
    for spec in (str(path), f"{path}:tiny"):
        config = config_lib.load_config_file(spec)
        config_lib.check_choices(config)
        if config.method == "downstream":
            assert config.downstream.task == path.stem
        else:
            assert config.method == path.stem


def test_json_round_trip_restores_tuples():
    config = config_lib.base_config()
    again = config_lib.from_json(config_lib.to_json(config))
    assert again.to_dict() == config.to_dict()


def test_cli_rejects_mistyped_key_before_any_work(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "medvlp_jax.main",
            "--config=configs/clip.py:tiny",
            f"--workdir={tmp_path}",
            "--config.data.batchsize=8",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "did you mean --config.data.batch_size" in result.stderr
    assert not (tmp_path / "config.json").exists()


def test_prerequisite_hash_counts_data_fields_only_off_their_default(monkeypatch):
    from medvlp_jax import prerequisites
    from medvlp_jax.data import config as data_config

    config = config_lib.load_config_file(str(ROOT / "configs/mcpl.py"))
    before = prerequisites.run_dir(config, "backbone")
    config.prerequisites.backbone.data.label_fraction = 0.1
    assert prerequisites.run_dir(config, "backbone") != before  # trains on other data
    config.prerequisites.backbone.data.label_fraction = 1.0
    assert prerequisites.run_dir(config, "backbone") == before
    # A data option added later, at a default that changes nothing, keeps cached runs valid.
    defaults = data_config.default_data_config

    def with_new_field():
        c = defaults()
        c.new_option = "off"
        return c

    monkeypatch.setattr(prerequisites, "default_data_config", with_new_field)
    config.prerequisites.backbone.data.new_option = "off"
    assert prerequisites.run_dir(config, "backbone") == before
    config.prerequisites.backbone.data.new_option = "on"
    assert prerequisites.run_dir(config, "backbone") != before
