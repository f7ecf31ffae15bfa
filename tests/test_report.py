"""The results report: numbers come from results.json exactly, goals are judged honestly."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from twinvae.errors import ConfigError
from twinvae.experiments import figures
from twinvae.experiments.reference import GOALS, PAPER_TABLE2
from twinvae.experiments.report import (
    MARKER,
    REPORT_FORMAT,
    build_report,
    collect_results,
    goal_check,
)
from twinvae.experiments.runner import RESULT_FORMAT

HARDWARE = {"cpu": "Test CPU 9000", "cpu_cores": 2, "torch": "2.13.0", "device": "cpu"}


def _entry(
    set_name: str,
    mae: float,
    mre: float,
    accuracy: float,
    *,
    model: str = "bundle",
    tta: bool = False,
) -> dict[str, Any]:
    suffix = "-tta" if tta else ""
    return {
        "set": set_name,
        "model": model,
        "tta": tta,
        "n": 398,
        "mae": mae,
        "mre": mre,
        "accuracy": accuracy,
        "per_count": {
            "1": {"n": 5.0, "mae": mae, "mre": mre, "accuracy": accuracy},
            "7": {"n": 3.0, "mae": 2 * mae, "mre": mre / 2, "accuracy": accuracy},
        },
        "command": f"twinvae evaluate out/{set_name}-{model}{suffix}.zip --data {set_name}",
        "json": f"out/eval/{set_name}.json",
    }


def _write_row(
    results_dir: Path,
    name: str,
    modality: str,
    *,
    kind: str = "train",
    paper: str | None = "twinvae-max-acc",
    seconds: float = 5400.0,
    evaluations: list[dict[str, Any]] | None = None,
    source: str | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    upper = modality.upper()
    data: dict[str, Any] = {
        "format": RESULT_FORMAT,
        "name": name,
        "kind": kind,
        "modality": modality,
        "paper": paper,
        "description": f"description of {name}",
        "from": source,
        "data_root": "nowhere/cho-k1",
        "data_root_resolved": "/nowhere/cho-k1",
        "data_split": {
            "train_chambers": 20,
            "test_chambers": 13,
            "test_chambers_also_in_train": 13,
        },
        "hardware": {**HARDWARE, "device": device},
        "files": {
            "checkpoint": "run/best.pt",
            "bundle": f"{name}.zip",
            "metrics": ["run/metrics.csv"],
        },
        "training": {
            "seconds": seconds,
            "seconds_with_sources": seconds + (1000.0 if source else 0.0),
            "epochs": 12,
            "stages": [],
            "from": source,
        },
        "evaluations": evaluations
        if evaluations is not None
        else [
            _entry(f"Nat-{upper}-L-Te", 0.6123, 0.0712, 0.5432),
            _entry(f"Syn-{upper}-L-Te", 1.2345, 0.1011, 0.3217),
        ],
        "commands": {"row": f"twinvae experiment plan.yaml --only {name} --out out"},
    }
    folder = results_dir / name
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(data))
    return data


def test_report_renders_the_numbers_of_results_json_exactly(tmp_path: Path) -> None:
    results = tmp_path / "results"
    _write_row(
        results,
        "twin-pc",
        "pc",
        evaluations=[
            _entry("Nat-PC-L-Te", 0.61234, 0.07126, 0.54321),
            _entry("Nat-PC-L-Te", 0.55551, 0.06, 0.60123, model="checkpoint", tta=True),
            _entry("Syn-PC-L-Te", 1.23456, 0.10119, 0.32179),
        ],
    )
    _write_row(
        results,
        "transfer-bf",
        "bf",
        kind="transfer",
        paper="transfer",
        source="twin-pc",
        seconds=3661.0,
        evaluations=[_entry("Nat-BF-L-Te", 0.4999, 0.05, 0.6100)],
    )
    _write_row(
        results,
        "ws-pc",
        "pc",
        kind="watershed",
        paper="watershed",
        seconds=12.0,
        evaluations=[_entry("Nat-PC-L-Te", 2.5452, 0.2849, 0.2437, model="watershed")],
    )
    report = build_report(results, tmp_path / "zoo", figures=False)
    markdown = report.markdown.read_text()
    assert markdown.startswith(MARKER)
    pc_row = next(line for line in markdown.splitlines() if line.startswith("| `twin-pc`"))
    cells = [cell.strip() for cell in pc_row.strip("|").split("|")]
    paper = PAPER_TABLE2["twinvae-max-acc"].pc
    assert cells[1:16] == [
        "Twin-VAE max-acc",
        "0.612",
        "7.13",
        "54.32",
        f"{paper.mae:.2f}",
        f"{paper.mre_percent:.2f}",
        f"{paper.accuracy_percent:.2f}",
        "1.235",
        "10.12",
        "32.18",
        "0.556",
        "60.12",
        "5,400 s (1.50 h)",
        "-",
        "400,000 s",
    ]
    assert (
        "| Nat-PC-L-Te | bundle | 398 | 0.612 | 7.13 | 54.32 "
        "| `twinvae evaluate out/Nat-PC-L-Te-bundle.zip --data Nat-PC-L-Te` |" in markdown
    )
    assert "| Nat-BF-L-Te | bundle | 398 | 0.500 | 5.00 | 61.00 |" in markdown
    assert "training time: 3,661 s (1.02 h), with source rows 4,661 s (1.29 h)" in markdown
    assert "13 of 13 test chambers also appear in train" in markdown
    assert "frame-level" in markdown
    assert "Test CPU 9000, 2 cores, torch 2.13.0, cpu" in markdown
    # Table 2 methods without a row of ours are listed as not run (double transfer: PC only)
    not_run = [line for line in markdown.splitlines() if line.startswith("| *not run*")]
    pc_methods = {"twinvae-natural-only", "transfer", "double-transfer", "bit-resnet"}
    bf_methods = {"twinvae-natural-only", "twinvae-max-acc", "bit-resnet", "watershed"}
    expected = [PAPER_TABLE2[k].method for k in PAPER_TABLE2 if k in pc_methods] + [
        PAPER_TABLE2[k].method for k in PAPER_TABLE2 if k in bf_methods
    ]
    assert [line.split("|")[2].strip() for line in not_run] == expected
    double = PAPER_TABLE2["double-transfer"].pc
    assert f"| {double.mae:.2f} | {double.mre_percent:.2f} | {double.accuracy_percent:.2f} |" in (
        next(line for line in not_run if "double" in line)
    )
    combined = json.loads(report.results.read_text())
    assert combined["format"] == REPORT_FORMAT
    assert [row["name"] for row in combined["rows"]] == ["twin-pc", "ws-pc", "transfer-bf"]
    assert combined["rows"][0]["evaluations"][0]["mae"] == 0.61234
    # other numbers in, other numbers out: nothing is hard-coded
    other = tmp_path / "other"
    _write_row(other, "twin-pc", "pc", evaluations=[_entry("Nat-PC-L-Te", 0.98765, 0.1, 0.25)])
    text = build_report(other, tmp_path / "zoo2", figures=False).markdown.read_text()
    assert "| `twin-pc` | Twin-VAE max-acc | 0.988 | 10.00 | 25.00 |" in text
    assert "0.612" not in text


def test_goal_check_says_by_how_much_the_goal_is_missed_or_beaten(tmp_path: Path) -> None:
    results = tmp_path / "results"
    _write_row(
        results,
        "pc-model",
        "pc",
        seconds=14_400.0,
        evaluations=[_entry("Nat-PC-L-Te", 0.70, 0.08, 0.50)],
    )
    _write_row(
        results,
        "bf-model",
        "bf",
        seconds=3600.0,
        evaluations=[_entry("Nat-BF-L-Te", 0.50, 0.05, 0.62)],
    )
    _write_row(
        results,
        "bf-watershed",
        "bf",
        kind="watershed",
        paper="watershed",
        evaluations=[_entry("Nat-BF-L-Te", 0.10, 0.01, 0.99, model="watershed")],
    )
    rows = collect_results(results)
    checks = goal_check(rows)
    assert checks["pc"]["best_mae"]["gap"] == pytest.approx(0.70 - GOALS["pc"].mae)
    assert checks["bf"]["best_mae"]["row"] == "bf-model"  # watershed rows are not candidates
    markdown = build_report(results, tmp_path / "zoo", figures=False).markdown.read_text()
    assert "MAE goal **not reached**: best `pc-model` 0.700, 0.120 above 0.58 (+20.7 %)" in markdown
    assert "accuracy goal **not reached**: best `pc-model` 50.00 %, 8.70 points short" in markdown
    assert "4.00 h of CPU training (with its source rows), 1.00 h over the 3 h budget" in markdown
    assert "MAE goal **reached** by `bf-model`: 0.500 (0.020 below 0.52)" in markdown
    assert "accuracy goal **reached** by `bf-model`: 62.00 % (1.26 points above)" in markdown
    assert "1.00 h of CPU training (with its source rows), within the 3 h budget" in markdown


def test_goal_check_without_rows_and_on_gpu(tmp_path: Path) -> None:
    results = tmp_path / "results"
    _write_row(
        results,
        "pc-gpu",
        "pc",
        device="cuda (Tesla P100)",
        evaluations=[_entry("Nat-PC-L-Te", 0.5, 0.05, 0.6)],
    )
    markdown = build_report(results, tmp_path / "zoo", figures=False).markdown.read_text()
    assert "no Twin-VAE row has been evaluated on Nat-BF-L-Te yet" in markdown
    assert "trained on cuda (Tesla P100), so the 3 CPU-hour budget does not apply" in markdown


def test_report_refuses_to_replace_files_it_did_not_write(tmp_path: Path) -> None:
    results = tmp_path / "results"
    _write_row(results, "pc-model", "pc")
    out = tmp_path / "zoo"
    out.mkdir()
    (out / "RESULTS.md").write_text("# hand-written\n")
    with pytest.raises(ConfigError, match="not written by `twinvae report`; pass --overwrite"):
        build_report(results, out, figures=False)
    build_report(results, out, figures=False, overwrite=True)
    build_report(results, out, figures=False)  # its own file may be regenerated
    assert (out / "RESULTS.md").read_text().startswith(MARKER)


def test_report_errors_and_skipped_figures(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="results folder not found"):
        collect_results(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"holds no <row>/results\.json"):
        collect_results(tmp_path / "empty")
    results = tmp_path / "results"
    _write_row(results, "pc-model", "pc")
    report = build_report(results, tmp_path / "zoo", embedding="pca")
    markdown = report.markdown.read_text()
    assert "pc-model: translations and latent space (checkpoint not found)" in markdown
    figure = tmp_path / "zoo" / "figures" / "mre_per_count_pc.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![MRE per true count on Nat-PC-L-Te](figures/mre_per_count_pc.png)" in markdown
    notes = tmp_path / "notes.md"
    notes.write_text("More epochs would close the gap.")
    text = build_report(results, tmp_path / "zoo", figures=False, notes=notes).markdown.read_text()
    assert "## Discussion\n\nMore epochs would close the gap." in text


def test_missing_umap_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "umap", None)
    with pytest.raises(ConfigError, match=r"umap-learn.*twinvae\[report\].*--embedding pca"):
        figures.embed(np.zeros((5, 3)), "umap")


def test_pca_embedding_keeps_the_main_direction() -> None:
    rng = np.random.default_rng(0)
    codes = np.outer(np.linspace(-1, 1, 50), [3.0, 0.0, 1.0]) + rng.normal(0, 0.01, (50, 3))
    points = figures.embed(codes, "pca")
    assert points.shape == (50, 2)
    assert abs(np.corrcoef(points[:, 0], codes[:, 0])[0, 1]) > 0.99


def test_report_says_which_metric_definitions_each_row_uses(tmp_path: Path) -> None:
    results = tmp_path / "results"
    new = _entry("Nat-PC-L-Te", 0.5, 0.05, 0.6)
    new["metrics_format"] = "twinvae-metrics/2"
    _write_row(results, "new-pc", "pc", evaluations=[new])
    _write_row(results, "old-pc", "pc", evaluations=[_entry("Nat-PC-L-Te", 0.5, 0.05, 0.6)])
    markdown = build_report(results, tmp_path / "out", figures=False).markdown.read_text()
    note = next(line for line in markdown.splitlines() if "Metric definitions" in line)
    assert "rounded count" in note and "`old-pc`" in note and "`new-pc`" not in note
