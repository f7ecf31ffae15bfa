"""Fine-tune a twinvae model on a few new labels by calling the twinvae command line.

The three command lines live in ``COMMANDS`` below, the one place to adjust them. Placeholders in
braces are filled from :class:`FineTuneSettings`; every placeholder becomes exactly one argument
(no shell is involved, so paths with spaces are safe).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "COMMANDS",
    "FineTuneSettings",
    "Step",
    "StepResult",
    "build_steps",
    "check_inputs",
    "find_twinvae",
    "flatten_metrics",
    "parse_json_output",
    "run_step",
]

# (step name, argument template). Edit here to follow changes of the twinvae command line.
COMMANDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "transfer",
        (
            "{twinvae}", "transfer",
            "--from", "{checkpoint}",
            "--config", "{config}",
            "--strategy", "thaw",
            "--set", "data.natural={new_labels_dir}",
            "--out", "{run_dir}",
        ),
    ),
    ("export", ("{twinvae}", "export", "{best_checkpoint}", "--out", "{new_bundle}")),
    ("evaluate", ("{twinvae}", "evaluate", "{new_bundle}", "--data", "{heldout_dir}", "--json")),
)  # fmt: skip

BEST_CHECKPOINT_NAME = "best.pt"
OUTPUT_TAIL_CHARS = 4000


@dataclass(frozen=True)
class FineTuneSettings:
    """Resolved inputs of the fine-tune workflow."""

    twinvae: str
    checkpoint: Path
    config: Path
    new_labels_dir: Path
    heldout_dir: Path
    run_dir: Path
    new_bundle: Path

    def placeholders(self) -> dict[str, str]:
        values = {key: str(value) for key, value in asdict(self).items()}
        values["best_checkpoint"] = str(self.run_dir / BEST_CHECKPOINT_NAME)
        return values


@dataclass(frozen=True)
class Step:
    name: str
    argv: tuple[str, ...]

    @property
    def command_line(self) -> str:
        return shlex.join(self.argv)


@dataclass(frozen=True)
class StepResult:
    step: str
    command: str
    returncode: int
    seconds: float
    output: str


def find_twinvae(explicit: str = "") -> str:
    """The twinvae executable: the explicit one, the one next to this Python, or the PATH one."""
    if explicit:
        candidate = shutil.which(explicit) or (explicit if Path(explicit).is_file() else None)
        if candidate is None:
            raise FileNotFoundError(f"twinvae executable {explicit!r} not found")
        return candidate
    scripts = Path(sys.executable).parent
    for name in ("twinvae", "twinvae.exe"):
        if (scripts / name).is_file():
            return str(scripts / name)
    found = shutil.which("twinvae")
    if found:
        return found
    raise FileNotFoundError(
        "The twinvae command is not installed in this Python environment. Install the twinvae "
        "package into the environment KNIME uses (Preferences > KNIME > Python), for example "
        "'pip install twinvae' or 'pip install -e <path to the twinvae project>', or set the "
        "workflow variable 'twinvae_executable' to the full path of the twinvae program."
    )


def build_steps(settings: FineTuneSettings) -> list[Step]:
    """The command lines of transfer, export and evaluate, filled in."""
    values = settings.placeholders()
    return [
        Step(name, tuple(token.format(**values) for token in template))
        for name, template in COMMANDS
    ]


def check_inputs(settings: FineTuneSettings) -> None:
    """Fail early, naming the file, when an input is missing or an output would be overwritten."""
    for label, path, want_dir in (
        ("checkpoint", settings.checkpoint, False),
        ("config", settings.config, False),
        ("new_labels_dir", settings.new_labels_dir, True),
        ("heldout_dir", settings.heldout_dir, True),
    ):
        if want_dir and not path.is_dir():
            raise FileNotFoundError(f"workflow variable '{label}': folder {path} does not exist")
        if not want_dir and not path.is_file():
            raise FileNotFoundError(f"workflow variable '{label}': file {path} does not exist")
    if settings.new_bundle.exists():
        raise FileExistsError(
            f"workflow variable 'new_bundle': {settings.new_bundle} exists already; delete it or "
            "choose another file name (results are never overwritten)"
        )


def run_step(
    step: Step, timeout: float | None = None, env: Mapping[str, str] | None = None
) -> StepResult:
    """Run one command; raise RuntimeError with its output when it fails."""
    started = time.monotonic()
    try:
        completed = subprocess.run(
            list(step.argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=dict(env) if env is not None else os.environ.copy(),
            check=False,
        )
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"step '{step.name}': cannot start {step.argv[0]}: {error}"
        ) from error
    seconds = time.monotonic() - started
    output = (completed.stdout + ("\n" if completed.stderr else "") + completed.stderr).strip()
    if completed.returncode != 0:
        raise RuntimeError(
            f"step '{step.name}' failed (exit code {completed.returncode}): {step.command_line}\n"
            f"{output[-OUTPUT_TAIL_CHARS:]}"
        )
    return StepResult(step.name, step.command_line, completed.returncode, seconds, completed.stdout)


def parse_json_output(text: str) -> Any:
    """The JSON document printed by a command (the whole output, or its last JSON line/block)."""
    stripped = text.strip()
    try:
        return json.loads(stripped)
    except json.JSONDecodeError:
        pass
    start = stripped.rfind("\n{")
    candidates = [stripped[start + 1 :]] if start >= 0 else []
    candidates += [
        line for line in reversed(stripped.splitlines()) if line.lstrip().startswith("{")
    ]
    for candidate in candidates:
        try:
            return json.loads(candidate)
        except json.JSONDecodeError:
            continue
    raise ValueError(f"the evaluation printed no JSON document: {stripped[-500:]!r}")


def flatten_metrics(document: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(metric, value) pairs from nested JSON; lists are indexed, scalars kept as they are."""
    if isinstance(document, Mapping):
        pairs: list[tuple[str, Any]] = []
        for key in document:
            pairs += flatten_metrics(document[key], f"{prefix}.{key}" if prefix else str(key))
        return pairs
    if isinstance(document, Sequence) and not isinstance(document, str):
        pairs = []
        for index, item in enumerate(document):
            pairs += flatten_metrics(item, f"{prefix}[{index}]")
        return pairs
    return [(prefix or "value", document)]
