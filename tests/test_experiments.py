"""Experiment plans and the runner: validation, ordering, resume/skip, a tiny plan end to end."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from typer.testing import CliRunner

from _experiment_data import write_fake_cho_k1
from twinvae.cli import experiment as experiment_cli
from twinvae.config import load_config
from twinvae.errors import CheckpointError, ConfigError, DataError
from twinvae.evaluation.metrics import METRICS_FORMAT
from twinvae.experiments import runner as runner_module
from twinvae.experiments.plan import (
    builtin_plans,
    execution_order,
    load_plan,
    plan_from_dict,
    row_config,
)
from twinvae.experiments.runner import RowPaths, run_plan, train_stage
from twinvae.models.twin_vae import TwinVAE
from twinvae.training.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from twinvae.training.run_dir import RunDirectory, RunDirectoryInUseError

TINY = [
    "model.base_channels=4",
    "model.latent_dim=8",
    "model.regressor_hidden=[8]",
    "train.epochs=1",
    "train.steps_per_epoch=2",
    "train.batch_size=8",
    "data.synthetic_ratio=0.5",
]


def _row(name: str, kind: str = "train", **extra: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"name": name, "kind": kind, **extra}
    if kind != "watershed":
        row.setdefault("config", "paper-pc")
    else:
        row.setdefault("modality", "pc")
    return row


# --- plan validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([_row("a", kind="fit")], r"rows\[0\] \(a\)\.kind: Input should be 'train', 'transfer'"),
        ([_row("a", kind="transfer")], r"rows\[0\] \(a\): .*needs from:"),
        ([_row("a"), _row("b", kind="transfer", **{"from": "c"})], r"from: 'c' is not a row"),
        ([_row("a"), _row("a")], r"row name 'a' is used twice"),
        (
            [
                _row("a", kind="transfer", **{"from": "b"}),
                _row("b", kind="transfer", **{"from": "a"}),
            ],
            r"cycle: a -> b -> a",
        ),
        ([_row("a", test_sets=["Nat-XX-L-Te"])], r"rows\[0\] \(a\)\.test_sets: unknown data set"),
        ([_row("w", kind="watershed", config="paper-pc")], r"watershed row takes no config"),
        ([_row("w", kind="watershed", modality=None)], r"needs modality"),
        ([_row("a", paper="resnet")], r"unknown Table 2 row 'resnet'"),
        ([_row("a", epochs=3)], r"rows\[0\] \(a\)\.epochs: Extra inputs are not permitted"),
        ([_row("a b")], r"rows\[0\] \(a b\)\.name: .*letters, digits"),
        ([_row("t", kind="train", **{"from": "x"})], r"use kind: transfer"),
        (
            [_row("w", kind="watershed"), _row("t", kind="transfer", **{"from": "w"})],
            r"watershed row",
        ),
    ],
)
def test_plan_validation_errors_name_the_row_and_key(
    rows: list[dict[str, Any]], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        plan_from_dict({"name": "p", "rows": rows}, origin="plan.yaml")
    assert str(caught.value).startswith("plan.yaml: invalid plan: ")


def test_plan_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="neither a file nor a builtin plan"):
        load_plan(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rows: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_plan(bad)
    bad.write_text("- just a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_plan(bad)
    bad.write_text("name: p\nrows: []\n")
    with pytest.raises(ConfigError, match="rows: List should have at least 1 item"):
        load_plan(bad)


def test_execution_order_puts_sources_first_and_only_pulls_dependencies() -> None:
    plan = plan_from_dict(
        {
            "name": "p",
            "rows": [
                _row("double", kind="transfer", **{"from": "there"}),
                _row("ws", kind="watershed"),
                _row("there", kind="transfer", **{"from": "base"}),
                _row("base"),
                _row("other"),
            ],
        }
    )
    order = [row.name for row in execution_order(plan)]
    assert order == ["ws", "base", "there", "double", "other"]
    assert [row.name for row in execution_order(plan, ["double"])] == ["base", "there", "double"]
    assert [row.name for row in execution_order(plan, ["other", "ws"])] == ["ws", "other"]
    with pytest.raises(ConfigError, match="--only nope: no such row"):
        execution_order(plan, ["nope"])


def test_row_config_points_data_at_the_root_and_applies_overrides_in_order(tmp_path: Path) -> None:
    custom = tmp_path / "custom.yaml"
    custom.write_text(yaml.safe_dump({"data": {"natural": "somewhere/pc"}, "train": {"epochs": 7}}))
    plan = plan_from_dict(
        {
            "name": "p",
            "data_root": "data/cho",
            "overrides": ["train.epochs=3", "train.seed=5"],
            "rows": [
                _row("bf-row", modality="bf", overrides=["train.seed=9"]),
                _row("custom", config=str(custom)),
                _row("double", kind="transfer", config="double-transfer", **{"from": "bf-row"}),
            ],
        }
    )
    config = row_config(plan, plan.row("bf-row"), extra=["train.epochs=4"])
    assert config.name == "bf-row"
    assert config.data.modality == "bf"
    assert config.data.natural == str(Path("data/cho") / "bf")
    assert (config.train.epochs, config.train.seed) == (4, 9)  # plan < --set < row
    custom_config = row_config(plan, plan.row("custom"), data_root="elsewhere")
    assert custom_config.data.natural == str(Path("elsewhere") / "pc")
    assert custom_config.train.epochs == 3
    double = row_config(plan, plan.row("double"))
    assert double.data.natural == str(Path("data/cho") / "bf")
    assert double.transfer is not None and double.transfer.second_stage is not None
    assert double.transfer.second_stage.data.natural == str(Path("data/cho") / "pc")
    plan.rows[2].modality = "bf"
    with pytest.raises(ConfigError, match="differs from the final"):
        row_config(plan, plan.row("double"))


def test_builtin_plans_validate_and_resolve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TWINVAE_CHO_K1", str(tmp_path))  # builtin plans run on $TWINVAE_CHO_K1
    assert {"paper-table2", "smoke"} <= set(builtin_plans())
    for name in builtin_plans():
        plan = load_plan(name)
        for row in plan.rows:
            if row.kind != "watershed":
                row_config(plan, row)
    table = load_plan("paper-table2")
    cnn = row_config(table, table.row("cnn-baseline-pc"))
    assert cnn.data.natural_only and cnn.loss.decoder_off
    assert (cnn.loss.kl_weight, cnn.data.labelled_fraction) == (0.0, 1.0)
    order = [r.name for r in execution_order(table, ["double-transfer-pc-bf-pc"])]
    assert order == ["twinvae-pc", "transfer-pc-to-bf", "double-transfer-pc-bf-pc"]


def test_builtin_transfer_rows_match_their_source_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transfer loads its source's weights: a model mismatch would only show after hours."""
    monkeypatch.setenv("TWINVAE_CHO_K1", str(tmp_path))
    for name in builtin_plans():
        plan = load_plan(name)
        for row in plan.rows:
            if row.kind == "transfer":
                assert row.from_row is not None
                source = row_config(plan, plan.row(row.from_row))
                assert row_config(plan, row).model == source.model, (name, row.name)
    budget = load_plan("cpu-budget")
    bf_rows = [row_config(budget, budget.row(r)) for r in ("twinvae-bf", "transfer-pc-to-bf")]
    assert {c.data.split_seed for c in bf_rows} == {4}  # both BF rows select on the same chambers
    assert all(c.model.standardize_input and c.train.num_threads == 1 for c in bf_rows)


# --- training steps: resume, skip, refuse ----------------------------------------------------


@pytest.fixture
def tiny_generated_config() -> Any:
    return load_config(
        "quick-cpu",
        [
            *TINY,
            "train.epochs=2",
            "data.natural_only=true",
            "data.generated_natural_count=40",
            "data.generated_natural_labelled=20",
        ],
    )


def _fake_checkpoint(config: Any, run_dir: Path, epoch: int, waited: int = 0) -> None:
    """last.pt/best.pt as a run killed after epoch ``epoch + 1`` would leave them."""
    model = TwinVAE(config.model)
    checkpoint = Checkpoint(
        config=config,
        model_state=model.state_dict(),
        epoch=epoch,
        trainer_state={"best_mae": 5.0, "best_epoch": 1, "epochs_since_best": waited},
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(checkpoint, run_dir / "last.pt")
    save_checkpoint(checkpoint, run_dir / "best.pt")


def test_train_stage_skips_complete_runs_and_refuses_changed_configs(
    tmp_path: Path, tiny_generated_config: Any
) -> None:
    messages: list[str] = []
    _fake_checkpoint(tiny_generated_config, tmp_path / "done", epoch=1)
    train_stage(
        tiny_generated_config, tmp_path / "done", progress=False, log=messages.append, label="train"
    )
    assert messages[-1] == "  train: training complete (2 epochs), kept"
    patient = tiny_generated_config.model_copy(
        update={
            "train": tiny_generated_config.train.model_copy(
                update={"epochs": 9, "early_stopping_patience": 3}
            )
        }
    )
    _fake_checkpoint(patient, tmp_path / "stopped", epoch=4, waited=3)
    train_stage(patient, tmp_path / "stopped", progress=False, log=messages.append, label="train")
    assert messages[-1] == "  train: training complete (5 epochs), kept"  # early stopping ended it
    changed = tiny_generated_config.model_copy(
        update={"optim": tiny_generated_config.optim.model_copy(update={"lr": 0.1})}
    )
    trained_lr = re.escape(str(tiny_generated_config.optim.lr))
    with pytest.raises(ConfigError, match=rf"different config.*optim\.lr: {trained_lr} != 0\.1"):
        train_stage(changed, tmp_path / "done", progress=False, log=messages.append, label="train")


def test_train_stage_resumes_an_interrupted_run(tmp_path: Path, tiny_generated_config: Any) -> None:
    run_dir = tmp_path / "run"
    _fake_checkpoint(tiny_generated_config, run_dir, epoch=0)
    messages: list[str] = []
    train_stage(tiny_generated_config, run_dir, progress=False, log=messages.append, label="leg 2")
    assert messages[-1].startswith("  leg 2: resuming at epoch 2/2 from ")
    assert load_checkpoint(run_dir / "last.pt").epoch == 1
    with (run_dir / "metrics.csv").open() as stream:
        assert [row["epoch"] for row in csv.DictReader(stream)] == ["2"]


def test_unstarted_run_folders_are_cleared_but_foreign_ones_refused(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("name: x\n")
    messages: list[str] = []
    runner_module._clear_unstarted(run_dir, messages.append)
    assert not any(run_dir.iterdir()) and "unfinished start" in messages[0]
    (run_dir / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"notes\.txt but no last\.pt"):
        runner_module._clear_unstarted(run_dir, messages.append)


def test_clearing_an_unstarted_run_leaves_a_run_in_its_first_epoch_alone(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    training = RunDirectory.new(run_dir)  # a run before its first checkpoint holds the lock
    messages: list[str] = []
    try:
        training.write_config(load_config("quick-cpu"))
        written = training.config_path.read_text()
        with pytest.raises(RunDirectoryInUseError, match=r"in use by another twinvae process"):
            runner_module._clear_unstarted(run_dir, messages.append)
        assert training.config_path.read_text() == written and not messages
    finally:
        training.close()
    runner_module._clear_unstarted(run_dir, messages.append)  # released: now it is cleared
    assert not any(run_dir.iterdir()) and "unfinished start" in messages[0]


def test_transfer_rows_notice_a_retrained_source(tmp_path: Path) -> None:
    paths = RowPaths(tmp_path / "row")
    source = tmp_path / "best.pt"
    source.write_bytes(b"version 1")
    first = runner_module._check_source(paths, source, started_fresh=True)
    assert runner_module._check_source(paths, source, started_fresh=False) == first
    source.write_bytes(b"version 2")
    with pytest.raises(CheckpointError, match=r"earlier version of .*best\.pt.*Delete"):
        runner_module._check_source(paths, source, started_fresh=False)


def test_missing_source_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    plan = plan_from_dict(
        {
            "name": "p",
            "data_root": str(tmp_path),
            "rows": [_row("base"), _row("moved", kind="transfer", **{"from": "base"})],
        }
    )
    context = runner_module.RunContext(
        plan=plan,
        out=tmp_path / "out",
        data_root=str(tmp_path),
        overrides=[],
        progress=False,
        log=lambda _m: None,
        plan_argument="p",
    )
    moved = plan.row("moved")
    with pytest.raises(CheckpointError, match=r"needs .*base/run/best\.pt.*run that row first"):
        runner_module._train_row(
            context, moved, row_config(plan, moved), context.row_paths("moved")
        )


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    plan = plan_from_dict(
        {
            "name": "p",
            "data_root": str(tmp_path),
            "rows": [
                _row("base"),
                _row("there", kind="transfer", config="transfer-pc-to-bf", **{"from": "base"}),
                _row("ws", kind="watershed"),
            ],
        }
    )
    messages: list[str] = []
    outcomes = run_plan(plan, tmp_path / "out", dry_run=True, log=messages.append)
    assert not (tmp_path / "out").exists()
    assert [o.name for o in outcomes] == ["base", "there", "ws"]
    assert outcomes[0].actions[0] == "run: new run"
    assert any("transfer from" in a and "base/run/best.pt" in a for a in outcomes[1].actions)
    assert "tune the watershed counter (48 parameter sets)" in outcomes[2].actions
    assert messages[0] == "[1/3] base (train)"


# --- a tiny plan end to end ------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_plan(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Train, export, evaluate and report a one-model + watershed plan on generated data."""
    base = tmp_path_factory.mktemp("experiment")
    root = write_fake_cho_k1(base / "cho-k1")
    plan_path = base / "tiny.yaml"
    plan_path.write_text(
        yaml.safe_dump(
            {
                "name": "tiny",
                "data_root": str(root),
                "overrides": TINY,
                "rows": [
                    _row("tiny-pc", paper="twinvae-max-acc"),
                    _row(
                        "tiny-ws",
                        kind="watershed",
                        paper="watershed",
                        test_sets=["Nat-PC-L-Te"],
                        grid={"min_size": [10, 5000]},
                    ),
                ],
            }
        )
    )
    out = base / "out"
    app = typer.Typer()
    experiment_cli.register(app)
    result = CliRunner().invoke(
        app,
        ["experiment", str(plan_path), "--out", str(out), "--embedding", "pca", "--no-progress"],
    )
    assert result.exit_code == 0, result.output
    return {"root": root, "plan": plan_path, "out": out, "output": result.output, "app": app}


@pytest.mark.slow
def test_end_to_end_results_hold_bundle_metrics_commands_and_hardware(
    finished_plan: dict[str, Any],
) -> None:
    from twinvae.evaluation.evaluate import evaluate

    out, root = finished_plan["out"], finished_plan["root"]
    row = out / "tiny-pc"
    results = json.loads((row / "results.json").read_text())
    assert (row / "tiny-pc.zip").is_file() and (row / "run" / "best.pt").is_file()
    sets = [(e["set"], e["model"], e["tta"]) for e in results["evaluations"]]
    assert sets == [
        ("Nat-PC-L-Te", "bundle", False),
        ("Nat-PC-L-Te", "checkpoint", True),
        ("Syn-PC-L-Te", "bundle", False),
    ]
    nat = results["evaluations"][0]
    assert nat["n"] == 4
    assert results["protocol"] == "paper-split" and nat["metrics_format"] == METRICS_FORMAT
    assert nat["overall"]["mae"] == nat["mae"] and "mae_unrounded" in nat["overall"]
    assert nat["command"] == (
        f"twinvae evaluate {row / 'tiny-pc.zip'} --data Nat-PC-L-Te --data-root {root} "
        f"--json {row / 'eval' / 'Nat-PC-L-Te.json'} --overwrite"
    )
    # the stored report is what `twinvae evaluate BUNDLE --data Nat-PC-L-Te` computes
    from twinvae.data.setnames import resolve_set_name

    fresh = evaluate(row / "tiny-pc.zip", resolve_set_name("Nat-PC-L-Te", str(root)))
    assert json.loads((row / "eval" / "Nat-PC-L-Te.json").read_text()) == json.loads(
        json.dumps(fresh)
    )
    assert nat["mae"] == fresh["overall"]["mae"]
    with (row / "run" / "metrics.csv").open() as stream:
        seconds = sum(float(r["seconds"]) for r in csv.DictReader(stream))
    assert results["training"]["seconds"] == pytest.approx(seconds)
    assert results["hardware"]["cpu_cores"] >= 1 and results["hardware"]["torch"]
    assert results["sha256"]["bundle"] == runner_module.sha256_file(row / "tiny-pc.zip")
    assert results["commands"]["export"].startswith(f"twinvae export {row / 'run' / 'best.pt'}")
    assert results["data_split"] == {
        "train_chambers": 3,
        "test_chambers": 2,
        "test_chambers_also_in_train": 2,
    }
    watershed = json.loads((out / "tiny-ws" / "results.json").read_text())
    assert watershed["params"]["min_size"] == 10  # the 5000-pixel filter counts nothing
    assert (out / "tiny-ws" / "watershed.json").is_file()
    assert watershed["evaluations"][0]["command"].startswith("twinvae watershed evaluate")


@pytest.mark.slow
def test_end_to_end_report_is_written_with_figures(finished_plan: dict[str, Any]) -> None:
    out = finished_plan["out"]
    markdown = (out / "RESULTS.md").read_text()
    results = json.loads((out / "tiny-pc" / "results.json").read_text())
    nat = results["evaluations"][0]
    assert f"| Nat-PC-L-Te | bundle | 4 | {nat['mae']:.3f} |" in markdown
    assert nat["command"] in markdown
    for figure in (
        "mre_per_count_pc",
        "training_tiny-pc",
        "translations_tiny-pc",
        "latent_tiny-pc",
    ):
        path = out / "figures" / f"{figure}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"figures/{figure}.png" in markdown
    combined = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in combined["rows"]] == ["tiny-pc", "tiny-ws"]


@pytest.mark.slow
def test_rerun_skips_finished_rows_and_refuses_a_changed_plan(
    finished_plan: dict[str, Any],
) -> None:
    out, plan = finished_plan["out"], load_plan(finished_plan["plan"])
    best = out / "tiny-pc" / "run" / "best.pt"
    stamp = best.stat().st_mtime_ns
    messages: list[str] = []
    outcomes = run_plan(plan, out, progress=False, log=messages.append)
    assert [o.actions for o in outcomes] == [["up to date"], ["up to date"]]
    assert best.stat().st_mtime_ns == stamp
    (out / "tiny-pc" / "results.json").unlink()  # e.g. killed after export, before the results
    run_plan(plan, out, only=["tiny-pc"], progress=False, log=messages.append)
    assert any("training complete (1 epochs), kept" in m for m in messages)
    assert any("is up to date" in m for m in messages)  # the bundle is not exported again
    assert (out / "tiny-pc" / "results.json").is_file()
    dry = run_plan(plan, out, overrides=["train.epochs=2"], dry_run=True, progress=False)
    assert dry[0].actions[0].startswith("run: CONFLICT: trained with a different config")
    with pytest.raises(ConfigError, match=r"different config.*train\.epochs: 1 != 2"):
        run_plan(plan, out, overrides=["train.epochs=2"], progress=False)


def test_keep_going_records_failures_and_skips_dependent_rows(tmp_path: Path) -> None:
    root = write_fake_cho_k1(tmp_path / "cho-k1")
    plan = plan_from_dict(
        {
            "name": "p",
            "data_root": str(root),
            "rows": [
                _row("broken", overrides=[f"data.natural={tmp_path / 'missing'}"]),
                _row("after", kind="transfer", **{"from": "broken"}),
                _row("ws", kind="watershed", test_sets=["Nat-PC-L-Te"], grid={"min_size": [10]}),
            ],
        }
    )
    with pytest.raises(DataError, match="missing"):
        run_plan(plan, tmp_path / "out", progress=False)
    messages: list[str] = []
    outcomes = run_plan(
        plan, tmp_path / "out2", progress=False, keep_going=True, log=messages.append
    )
    assert [(o.name, o.failed) for o in outcomes] == [
        ("broken", True),
        ("after", True),
        ("ws", False),
    ]
    assert outcomes[0].actions[0].startswith("FAILED: ") and "missing" in outcomes[0].actions[0]
    assert outcomes[1].actions == ["skipped (broken failed)"]
    assert (tmp_path / "out2" / "ws" / "results.json").is_file()
