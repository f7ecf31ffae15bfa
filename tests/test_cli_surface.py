"""The CLI as a user reads it: help of every command at 80 columns, console output, JSON types.

The help checks walk the whole typer/click command tree, so new commands are checked too.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import typer.main
from typer.testing import CliRunner

from conftest import FolderMaker
from twinvae.cli.main import app
from twinvae.config import ExperimentConfig, builtin_configs
from twinvae.demo import DemoResult, DemoStep
from twinvae.export.checks import CheckResult, ValidationReport
from twinvae.models.twin_vae import ModelConfig, TwinVAE
from twinvae.training.checkpoint import Checkpoint, save_checkpoint

WIDTH = 80
MIN_DESCRIPTION_WIDTH = 40
runner = CliRunner()


def _commands(command: Any = None, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """The path of every command and group under the root, the root itself as ()."""
    command = command if command is not None else typer.main.get_command(app)
    yield path
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        yield from _commands(sub, (*path, name))


def _command(path: tuple[str, ...]) -> Any:
    command: Any = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    return command


COMMANDS = list(_commands())
IDS = [" ".join(path) or "twinvae" for path in COMMANDS]


@functools.cache
def _help(path: tuple[str, ...]) -> str:
    """`twinvae PATH --help` as printed in an 80-column terminal."""
    result = runner.invoke(
        app, [*path, "--help"], env={"COLUMNS": str(WIDTH)}, terminal_width=WIDTH
    )
    assert result.exit_code == 0, result.output
    return result.output


def _flat(text: str) -> str:
    """Whitespace collapsed, and words split at a hyphen by line wrapping joined again."""
    return re.sub(r"-\s+", "-", " ".join(text.split()))


def _description_column(output: str, name: str, help_text: str) -> int:
    """The column where the help of the parameter shown as `name` starts."""
    lines = output.splitlines()
    word = re.escape(help_text.split()[0])
    named = re.compile(rf"(?<![\w-]){re.escape(name)}(?![\w-])")
    for index, line in enumerate(lines):
        found = named.search(line)
        if found is None:
            continue
        # the description follows the term after two spaces, or starts the next line
        same_line = re.compile(rf"(?<=\s\s){word}").search(line, found.end())
        if same_line is not None:
            return same_line.start()
        following = re.compile(rf"^\W*\s{{2,}}{word}").match(lines[index + 1])
        if following is not None:
            return following.end() - len(help_text.split()[0])
    raise AssertionError(f"{name} and its help {help_text[:30]!r}... not found in:\n{output}")


@pytest.mark.parametrize("path", COMMANDS, ids=IDS)
def test_flags_show_no_value_metavar(path: tuple[str, ...]) -> None:
    output = _help(path)
    assert "<bool>" not in output
    assert re.search(r"^\s*--help\s{2,}Show this message", output, re.MULTILINE), output
    for param in _command(path).params:
        if getattr(param, "is_flag", False):
            options = output.partition("\nOptions:\n")[2].splitlines()
            terms = [line.strip().split("  ")[0] for line in options if line.startswith("  -")]
            (term,) = [term for term in terms if param.opts[0] in term.replace(",", "").split()]
            assert "<" not in term, term


@pytest.mark.parametrize("path", COMMANDS, ids=IDS)
def test_repeatable_options_show_the_value_of_one_use(path: tuple[str, ...]) -> None:
    """`--set KEY=VALUE` is given once per value: its metavar is no `<list[str]>`."""
    output = _help(path)
    for param in _command(path).params:
        if param.param_type_name == "option" and param.multiple:
            named = re.compile(rf"(?<![\w-]){re.escape(param.opts[0])}(?![\w-])")
            shown = [line for line in output.splitlines() if named.search(line)]
            assert shown and not [line for line in shown if "<list[" in line], shown


@pytest.mark.parametrize("path", COMMANDS, ids=IDS)
def test_help_reads_at_80_columns(path: tuple[str, ...]) -> None:
    output = _help(path)
    assert max(len(line) for line in output.splitlines()) <= WIDTH, output
    command = _command(path)
    for param in command.params:
        if param.hidden or not getattr(param, "help", None):
            continue
        name = param.opts[0] if param.param_type_name == "option" else param.metavar or param.name
        column = _description_column(output, name, param.help)
        assert WIDTH - column >= MIN_DESCRIPTION_WIDTH, f"{name}: help starts at {column}"
    # a group lists each command with its whole first sentence, not cut off with "..."
    for name, sub in getattr(command, "commands", {}).items():
        if sub.hidden:
            continue
        summary = re.split(r"(?<=\.)\s+(?=[A-Z])", " ".join((sub.help or "").split()))[0]
        assert _flat(summary) in _flat(output), f"{name}: {summary!r} not listed whole"
    listed = output.partition("\nCommands:\n")[2].splitlines()
    assert not [line for line in listed if line.rstrip().endswith("...")], output


@pytest.mark.parametrize("command", ["train", "transfer"])
def test_train_and_transfer_help_list_every_builtin_config(command: str) -> None:
    output = _help((command,))
    names = builtin_configs()
    assert len(names) >= 8  # the configs folder holds the papers' configs and quick-cpu
    for name in names:  # each name whole on one line (click would break it at a hyphen)
        assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", output), name


def test_zoo_build_refuses_a_zip_file_name_for_its_folder(tmp_path: Path) -> None:
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    (zoo / "collection.yaml").write_text("format: twinvae-zoo/1\nmodels: []\n")
    target = tmp_path / "cho-k1-pc-x.zip"
    result = runner.invoke(
        app, ["zoo", "build", "cho-k1-pc-x", "--out", str(target), "--zoo-dir", str(zoo)]
    )
    assert result.exit_code == 2, result.output
    assert "folder" in result.output and "cho-k1-pc-x.zip" in result.output
    assert not target.exists()
    assert "a folder, not a file name" in _flat(_help(("zoo", "build")))


def test_demo_prints_each_step_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    steps = [
        DemoStep("generate data", "demo/data", 1.0, "600 natural-style"),
        DemoStep("train quick-cpu", "demo/run", 2.0, "best validation MAE 1.50"),
    ]

    def fake_run_demo(out: Path, **options: Any) -> DemoResult:
        for step in steps:
            options["report"](step)
        return DemoResult(out=out, steps=steps)

    monkeypatch.setattr("twinvae.demo.run_demo", fake_run_demo)
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo"), "--no-progress"])
    assert result.exit_code == 0, result.output
    for step in steps:
        assert result.output.count(step.name) == 1, result.output
        assert result.output.count(step.detail) == 1, result.output


def test_validation_report_leaves_out_the_maintainers_warning(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from twinvae.cli.export import print_report

    # what bioimageio.spec 0.5 says of every bundle without a GitHub account to maintain it
    maintainers = (
        "Missing `maintainers` or any author in `authors` with a specified `github_user` name."
    )
    check = CheckResult(
        "bioimageio format",
        True,
        "valid model 0.5.12",
        warnings=[maintainers, f"authors: {maintainers}", "inputs.0: a warning to read"],
    )
    print_report(ValidationReport(bundle=Path("model.zip"), checks=[check]))
    printed = capsys.readouterr().out
    assert "maintainers" not in printed
    assert "a warning to read" in printed


def test_evaluate_json_writes_counts_as_integers(
    tmp_path: Path, make_image_folder: FolderMaker
) -> None:
    torch.manual_seed(0)
    tiny = ModelConfig(base_channels=4, latent_dim=8, regressor_hidden=(8,))
    checkpoint = tmp_path / "tiny.pt"
    state = TwinVAE(tiny).state_dict()
    save_checkpoint(Checkpoint(config=ExperimentConfig(model=tiny), model_state=state), checkpoint)
    folder = make_image_folder(
        ["a.png", "b.png", "c.png", "d.png"], counts={"a.png": 2, "b.png": 2, "c.png": 5}
    )
    report = tmp_path / "report.json"
    args = ["evaluate", str(checkpoint), "--data", str(folder), "--json", str(report)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    written = json.loads(report.read_text())
    assert written["overall"]["n"] == 3 and isinstance(written["overall"]["n"], int)
    per_count = {count: metrics["n"] for count, metrics in written["per_count"].items()}
    assert per_count == {"2": 2, "5": 1}
    assert all(isinstance(n, int) for n in per_count.values())


def test_torch_trace_debug_records_stay_out_of_the_captured_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """torch logs its structured trace at DEBUG to the logger torch.__trace, dozens of records
    per ONNX export; pyproject's log_level keeps them out of the log pytest shows on failure."""
    trace_log = logging.getLogger("torch.__trace")
    assert trace_log.isEnabledFor(logging.DEBUG)  # as torch sets it up on import
    trace_log.debug("a structured trace record")
    debug = [record.name for record in caplog.records if record.levelno < logging.WARNING]
    assert not debug, f"{len(debug)} records below WARNING, e.g. {debug[:3]}"
