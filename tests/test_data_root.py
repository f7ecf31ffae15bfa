"""Where the CHO-K1 data set is: $TWINVAE_CHO_K1 or --data-root, never a development path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from twinvae.cli.main import app
from twinvae.config import CONFIG_DIR, builtin_configs, load_config
from twinvae.data.cho_k1 import ENV_VAR, cho_k1_root
from twinvae.errors import ConfigError, DataError
from twinvae.experiments.plan import builtin_plans, load_plan, row_config

runner = CliRunner()


@pytest.fixture
def fake_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty CHO-K1 folder (bf/ and pc/) named by $TWINVAE_CHO_K1."""
    root = tmp_path / "cho"
    (root / "bf").mkdir(parents=True)
    (root / "pc").mkdir()
    monkeypatch.setenv(ENV_VAR, str(root))
    return root


@pytest.fixture
def no_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)


def test_no_shipped_file_names_the_development_layout() -> None:
    package = CONFIG_DIR.parent
    offenders = [
        str(path.relative_to(package))
        for path in sorted(package.rglob("*"))
        if path.suffix in (".py", ".yaml") and "shared/data" in path.read_text(encoding="utf-8")
    ]
    assert offenders == []


def test_root_comes_from_the_option_then_the_environment(fake_root: Path, tmp_path: Path) -> None:
    assert cho_k1_root() == fake_root
    other = tmp_path / "other"
    other.mkdir()
    assert cho_k1_root(other) == other


def test_unset_root_says_what_to_set(no_root: None) -> None:
    with pytest.raises(ConfigError) as error:
        cho_k1_root()
    message = str(error.value)
    assert f"{ENV_VAR}=/path/to/cho-k1" in message and "--set data.natural=PATH" in message


def test_missing_root_names_where_it_came_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "gone"))
    with pytest.raises(DataError, match=rf"{ENV_VAR}={tmp_path / 'gone'}: folder not found"):
        cho_k1_root()
    with pytest.raises(DataError, match=rf"--data-root {tmp_path / 'away'}: folder not found"):
        cho_k1_root(tmp_path / "away")


@pytest.mark.parametrize("name", ["paper-pc", "paper-bf", "double-transfer"])
def test_builtin_configs_resolve_the_reference_and_record_the_path(
    fake_root: Path, tmp_path: Path, name: str
) -> None:
    config = load_config(name)
    modality = config.data.modality
    assert config.data.natural == str(fake_root / modality)
    saved = yaml.safe_load(config.to_yaml())
    assert saved["data"]["natural"] == str(fake_root / modality)  # the run records the path
    second = config.transfer.second_stage if config.transfer is not None else None
    if second is not None:
        assert second.data.natural == str(fake_root / second.data.modality)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert load_config(name, data_root=elsewhere).data.natural == str(elsewhere / modality)


def test_every_builtin_config_loads_without_a_root_only_when_it_needs_none(no_root: None) -> None:
    for name in builtin_configs():
        text = (CONFIG_DIR / f"{name}.yaml").read_text(encoding="utf-8")
        if "cho-k1:" in text:
            with pytest.raises(ConfigError, match=ENV_VAR):
                load_config(name)
            overrides = ["data.natural=my/images"]
            if "second_stage" in text:
                overrides.append("transfer.second_stage.data.natural=my/other")
            overridden = load_config(name, overrides)
            assert overridden.data.natural == "my/images"
        else:
            load_config(name)


def test_plans_use_the_resolved_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    smoke = load_plan("smoke")
    assert smoke.data_root is None  # builtin plans name no folder
    with pytest.raises(ConfigError, match=ENV_VAR):
        row_config(smoke, smoke.rows[0])
    root = tmp_path / "cho"
    root.mkdir()
    monkeypatch.setenv(ENV_VAR, str(root))
    given = tmp_path / "given"
    for name in builtin_plans():
        plan = load_plan(name)
        for row in (row for row in plan.rows if row.kind != "watershed"):
            config = row_config(plan, row)
            assert config.data.natural == str(root / config.data.modality)
            explicit = row_config(plan, row, data_root=str(given))
            assert explicit.data.natural == str(given / config.data.modality)


def test_evaluate_without_a_root_says_what_to_set(tmp_path: Path, no_root: None) -> None:
    result = runner.invoke(app, ["evaluate", str(tmp_path / "m.pt"), "--data", "Nat-PC-L-Te"])
    assert result.exit_code == 1
    assert f"{ENV_VAR}=/path/to/cho-k1" in str(result.exception)


def test_train_takes_a_data_root(tmp_path: Path, no_root: None) -> None:
    root = tmp_path / "cho"
    root.mkdir()
    result = runner.invoke(
        app, ["train", "--config", "paper-pc", "--data-root", str(root), "--no-progress"]
    )
    assert result.exit_code == 1
    assert isinstance(result.exception, DataError)
    assert str(root / "pc") in str(result.exception)  # the reference was resolved under root
