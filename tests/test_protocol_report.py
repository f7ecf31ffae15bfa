"""`twinvae protocol report` (RESULTS.md from protocol results) and `--method bundle:PATH`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from _experiment_data import write_fake_cho_k1
from twinvae.cli.main import app
from twinvae.config import ExperimentConfig
from twinvae.data.readers import read_count_csv
from twinvae.errors import ConfigError
from twinvae.evaluation.evaluate import evaluate
from twinvae.models.twin_vae import ModelConfig, TwinVAE
from twinvae.protocols.folds import fold_file_text, list_frames, load_folds, make_fold_file
from twinvae.protocols.report import MARKER, build_protocol_report
from twinvae.protocols.runner import ProtocolRun, resolve_method, run_protocol
from twinvae.protocols.summary import collect, summarize
from twinvae.training.checkpoint import Checkpoint, save_checkpoint

runner = CliRunner()


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_cho_k1(
        tmp_path_factory.mktemp("cho-k1"), train_chambers=5, frames=8, test_frames=4
    )


@pytest.fixture(scope="module")
def fake_folds(fake_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("folds") / "folds.yaml"
    path.write_text(fold_file_text(make_fold_file(list_frames(fake_root, "pc"), "pc", 2, 0)))
    return path


def _run(root: Path, out: Path, protocol: str, method: str, folds: Path | None = None) -> Any:
    run = ProtocolRun(out, str(root))
    if folds is not None:
        run.fold_file, run.fold_file_path = load_folds(folds), folds
    return run_protocol(protocol, resolve_method(method, "pc"), run)  # type: ignore[arg-type]


@pytest.fixture
def results(
    fake_root: Path, fake_folds: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Rule results under all three protocols, made in tmp_path with a relative --out (as the
    project's runs are) and an absolute data root."""
    monkeypatch.chdir(tmp_path)
    out = Path("runs")
    _run(fake_root, out, "chamber-cv", "predict-training-mean", fake_folds)
    _run(fake_root, out, "paper-split", "predict-training-mean")
    _run(fake_root, out, "anchored", "nearest-label")
    return out


def _result(path: Path | None) -> dict[str, Any]:
    assert path is not None
    return dict(json.loads(path.read_text(encoding="utf-8")))


def _table_rows(markdown: str, method: str) -> list[str]:
    return [line for line in markdown.splitlines() if line.startswith(f"| `{method}` |")]


def test_report_puts_chamber_cv_first_with_mean_sd_folds_and_commands(
    results: Path, fake_root: Path, tmp_path: Path
) -> None:
    report = build_protocol_report(results, Path("zoo"), figures=False)
    markdown = report.markdown.read_text(encoding="utf-8")
    assert markdown.splitlines()[0] == MARKER
    order = [markdown.index(f"### {p}") for p in ("chamber-cv", "paper-split", "anchored")]
    assert order == sorted(order)
    cv = next(e for e in summarize(collect(results)) if e["protocol"] == "chamber-cv")
    mean, std = cv["mean"]["mae"], cv["std"]["mae"]
    rows = _table_rows(markdown, "predict-training-mean")
    # chamber-cv: the mean row (command without --fold) and one row per fold; paper-split
    assert len(rows) == 1 + 2 + 1
    assert f"| 2 of 2 | {mean:.3f} ± {std:.3f} |" in rows[0]
    assert "`twinvae protocol chamber-cv --method predict-training-mean" in rows[0]
    assert " --fold " not in rows[0] and "--data-root $TWINVAE_CHO_K1" in rows[0]
    for fold, row in enumerate(rows[1:3]):
        assert f"{cv['per_fold'][fold]['mae']:.3f}" in row and f"--fold {fold}" in row
    assert "`twinvae protocol paper-split --method predict-training-mean" in rows[3]
    assert (
        "| paper: Twin-VAE max-acc | Kenneweg, Stallmann & Hammer 2023, Table 2 | - | 0.60 |"
        in (markdown)
    )
    assert len(_table_rows(markdown, "nearest-label")) == 1  # anchored only
    assert "Not run under anchored (results under another protocol only): " in markdown
    # no path of this machine: the data root became a placeholder, the working folder relative
    written = [report.markdown, report.summary, *Path("zoo/results").rglob("*.json")]
    for path in written:
        text = path.read_text(encoding="utf-8")
        assert str(fake_root) not in text and str(tmp_path) not in text, path
    copied = json.loads(
        Path("zoo/results/chamber-cv/pc/predict-training-mean/fold-0/eval.json").read_text()
    )  # a fold's frames are listed with absolute paths
    assert copied["predictions"][0]["file"].startswith("$TWINVAE_CHO_K1/pc/")


def test_report_made_again_from_its_copies_gives_the_same_tables(results: Path) -> None:
    first = build_protocol_report(results, Path("zoo"), figures=False).markdown.read_text()
    again = build_protocol_report(Path("zoo/results"), Path("zoo"), figures=False)
    second = again.markdown.read_text()

    def tables(text: str) -> list[str]:
        return [line for line in text.splitlines() if line.startswith("|")]

    assert tables(first) == tables(second) and len(tables(first)) > 10
    assert "twinvae protocol report zoo/results --out zoo" in second


def test_report_names_missing_folds_and_drops_stale_copies(results: Path) -> None:
    build_protocol_report(results, Path("zoo"), figures=False)
    gone = results / "chamber-cv/pc/predict-training-mean/fold-1"
    (gone / "result.json").unlink()
    report = build_protocol_report(results, Path("zoo"), figures=False)
    markdown = report.markdown.read_text()
    assert "`predict-training-mean`: fold(s) 1 missing; its row is the mean of 1 fold(s)" in (
        markdown
    )
    assert report.incomplete == ["chamber-cv pc predict-training-mean: folds 1 missing"]
    assert not Path("zoo/results/chamber-cv/pc/predict-training-mean/fold-1").exists()


def test_report_draws_its_figures_and_refuses_a_results_file_it_did_not_write(
    results: Path,
) -> None:
    report = build_protocol_report(results, Path("zoo"))
    names = sorted(p.name for p in report.figures)
    assert names == [
        "protocol-error-per-count-pc.png",
        "protocol-scatter-anchored-pc.png",
        "protocol-scatter-chamber-cv-pc.png",
        "protocol-scatter-paper-split-pc.png",
        "protocol-time-pc.png",
    ]
    markdown = report.markdown.read_text()
    for path in report.figures:
        assert path.read_bytes().startswith(b"\x89PNG") and f"(figures/{path.name})" in markdown
    report.markdown.write_text("# my own notes\n")
    with pytest.raises(ConfigError, match=r"RESULTS\.md: exists and was not written"):
        build_protocol_report(results, Path("zoo"), figures=False)
    done = runner.invoke(
        app, ["protocol", "report", str(results), "--out", "zoo", "--no-figures", "--overwrite"]
    )
    assert done.exit_code == 0, done.output
    assert report.markdown.read_text().startswith(MARKER)


# --- a finished bundle as the method ---------------------------------------------------------

TINY = ModelConfig(base_channels=4, latent_dim=8, regressor_hidden=(8,))


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from twinvae.export import ExportOptions, export_bundle

    folder = tmp_path_factory.mktemp("bundle")
    torch.manual_seed(0)
    checkpoint = Checkpoint(
        config=ExperimentConfig(name="tiny-pc", model=TINY),
        model_state=TwinVAE(TINY).state_dict(),
        epoch=0,
        metrics={},
    )
    save_checkpoint(checkpoint, folder / "best.pt")
    out = folder / "tiny-pc.zip"
    export_bundle(folder / "best.pt", out, ExportOptions(check_images=4))
    return out


@pytest.mark.slow
def test_a_bundle_is_evaluated_under_paper_split_and_anchored_only(
    tiny_bundle: Path, fake_root: Path, tmp_path: Path
) -> None:
    method = resolve_method(f"bundle:{tiny_bundle}", None)
    assert (method.name, method.kind, method.modality) == ("tiny-pc", "bundle", "pc")
    run = ProtocolRun(tmp_path / "out", str(fake_root))
    paper = _result(run_protocol("paper-split", method, run)[0].result)
    expected = evaluate(tiny_bundle, read_count_csv(fake_root / "pc" / "test.csv", modality="pc"))
    assert paper["method_kind"] == "bundle" and paper["overall"] == expected["overall"]
    assert paper["commands"]["result"].startswith(
        f"twinvae protocol paper-split --method bundle:{tiny_bundle} --modality pc"
    )
    assert paper["zoo_entry"] is None  # not a model of the project's zoo
    anchored = _result(run_protocol("anchored", method, run)[0].result)
    assert anchored["protocol"] == "anchored" and anchored["overall"] == paper["overall"]
    with pytest.raises(ConfigError, match="chamber-cv retrains a training config per fold"):
        method.check_protocol("chamber-cv")
    with pytest.raises(ConfigError, match="counts pc images"):
        resolve_method(f"bundle:{tiny_bundle}", "bf")
    with pytest.raises(ConfigError, match="is not a file"):
        resolve_method(f"bundle:{tmp_path / 'missing.zip'}", None)
