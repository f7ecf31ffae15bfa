"""Errors of --set overrides name the override (and the likely key), not the config file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from twinvae.config import load_config
from twinvae.errors import ConfigError


def _error(source: str | Path, overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as error:
        load_config(source, overrides)
    return str(error.value)


def test_unknown_override_key_names_the_override_and_the_likely_key() -> None:
    message = _error("quick-cpu", ["train.epochs=3", "train.epohcs=2"])
    assert message.startswith("--set train.epohcs=2: ")
    assert "train.epohcs" in message and "did you mean train.epochs?" in message
    assert "quick-cpu.yaml" not in message


def test_unknown_section_and_far_off_key() -> None:
    message = _error("quick-cpu", ["trian.epochs=2"])
    assert message.startswith("--set trian.epochs=2: ") and "did you mean train?" in message
    far = _error("quick-cpu", ["train.zzzzzz=1"])
    assert far.startswith("--set train.zzzzzz=1: ") and "did you mean" not in far
    assert "epochs" in far  # lists the keys of the section instead


def test_bad_override_value_names_the_override() -> None:
    message = _error("quick-cpu", ["train.epochs=many"])
    assert message.startswith("--set train.epochs=many: train.epochs: ")
    assert "integer" in message and "quick-cpu.yaml" not in message


def test_errors_of_the_file_still_name_the_file(tmp_path: Path) -> None:
    config = tmp_path / "mine.yaml"
    config.write_text(yaml.safe_dump({"train": {"epoch": 3}}), encoding="utf-8")
    message = _error(config, ["train.seed=1"])
    assert message.startswith(f"{config}: invalid config: train.epoch")
    assert "did you mean train.epochs?" in message and "--set" not in message


def test_renamed_and_free_form_keys_are_still_accepted() -> None:
    config = load_config(
        "quick-cpu", ["train.parallel_backward=false", "data.synthetic_generator.seed_offset=3"]
    )
    assert config.train.parallel_domains is False
    assert config.data.synthetic_generator == {"seed_offset": 3}
