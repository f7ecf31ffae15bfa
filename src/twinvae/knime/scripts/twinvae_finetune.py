"""Fine-tune a twinvae model bundle on a few new labels by calling the twinvae command line.

The workflow starts from a bioimage.io bundle (the count workflow's model): ``twinvae transfer
--from BUNDLE`` fine-tunes it, ``twinvae export`` writes the new bundle and ``twinvae evaluate``
measures it on held-out labels. A bundle that attaches the whole Twin-VAE
(``twinvae_weights.safetensors``) is fine-tuned with the synthetic twin; an older one, which
holds only the counting path, on the natural images alone (``--natural-only``).

The three command lines live in ``COMMANDS`` below, the one place to adjust them. Placeholders in
braces are filled from :class:`FineTuneSettings`; every placeholder becomes exactly one argument,
except ``{*transfer_options}``, which becomes the optional arguments of `transfer_options` (no
shell is involved, so paths with spaces are safe).
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "COMMANDS",
    "OPTIONAL_FLAGS",
    "FineTuneSettings",
    "Step",
    "StepResult",
    "build_steps",
    "check_inputs",
    "find_twinvae",
    "flatten_metrics",
    "read_metrics",
    "run_step",
    "transfer_options",
]

# (step name, argument template). Edit here to follow changes of the twinvae command line.
COMMANDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "transfer",
        (
            "{twinvae}", "transfer",
            "--from", "{bundle}",
            "--strategy", "{strategy}",
            "--set", "data.natural={new_labels_dir}",
            "--set", "data.modality={modality}",
            "{*transfer_options}",
            "--out", "{run_dir}",
        ),
    ),
    ("export", ("{twinvae}", "export", "{best_checkpoint}", "--out", "{new_bundle}")),
    (
        "evaluate",
        ("{twinvae}", "evaluate", "{new_bundle}", "--data", "{heldout_dir}", "--json", "{metrics}"),
    ),
)  # fmt: skip
OPTIONAL_FLAGS = ("--config", "--natural-only", "--set")
"""The transfer options `transfer_options` may add (checked against the CLI by the tests)."""
EXPANDED = "{*transfer_options}"

BEST_CHECKPOINT_NAME = "best.pt"
METRICS_SUFFIX = ".metrics.json"
OUTPUT_TAIL_CHARS = 4000


@dataclass(frozen=True)
class FineTuneSettings:
    """Resolved inputs of the fine-tune workflow.

    config: a builtin twinvae config name or a YAML file ("" = twinvae transfer's default);
    natural_only: the bundle holds only the counting path (no whole Twin-VAE attached);
    settings: further ``key=value`` config overrides, one ``--set`` each.
    """

    twinvae: str
    bundle: Path
    new_labels_dir: Path
    heldout_dir: Path
    run_dir: Path
    new_bundle: Path
    modality: str = "other"
    strategy: str = "thaw"
    config: str = ""
    natural_only: bool = False
    settings: tuple[str, ...] = field(default_factory=tuple)

    @property
    def metrics(self) -> Path:
        """Where the evaluate step writes its JSON report: beside the new bundle."""
        return self.new_bundle.with_name(self.new_bundle.stem + METRICS_SUFFIX)

    def placeholders(self) -> dict[str, str]:
        return {
            "twinvae": self.twinvae,
            "bundle": str(self.bundle),
            "new_labels_dir": str(self.new_labels_dir),
            "heldout_dir": str(self.heldout_dir),
            "run_dir": str(self.run_dir),
            "new_bundle": str(self.new_bundle),
            "modality": self.modality,
            "strategy": self.strategy,
            "best_checkpoint": str(self.run_dir / BEST_CHECKPOINT_NAME),
            "metrics": str(self.metrics),
        }


def transfer_options(settings: FineTuneSettings) -> list[str]:
    """The optional transfer arguments: --config, --natural-only, --set KEY=VALUE."""
    options: list[str] = []
    if settings.config:
        options += ["--config", settings.config]
    if settings.natural_only:
        options.append("--natural-only")
    for item in settings.settings:
        options += ["--set", item]
    return options


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
    steps = []
    for name, template in COMMANDS:
        argv: list[str] = []
        for token in template:
            if token == EXPANDED:
                argv += transfer_options(settings)
            else:
                argv.append(token.format(**values))
        steps.append(Step(name, tuple(argv)))
    return steps


def check_inputs(settings: FineTuneSettings) -> None:
    """Fail early, naming the file, when an input is missing or an output would be overwritten."""
    if not settings.bundle.exists():
        raise FileNotFoundError(
            f"workflow variable 'bundle': no model bundle at {settings.bundle}; set it to a "
            "bundle (.zip) made by 'twinvae export' or 'twinvae zoo build' (the count "
            "workflow's model), or rebuild the workflows with 'twinvae knime build --bundle "
            "<model.zip>' so that data/model.zip exists"
        )
    for label, path in (
        ("new_labels_dir", settings.new_labels_dir),
        ("heldout_dir", settings.heldout_dir),
    ):
        if not path.is_dir():
            raise FileNotFoundError(f"workflow variable '{label}': folder {path} does not exist")
    if settings.config.endswith((".yaml", ".yml")) and not Path(settings.config).is_file():
        raise FileNotFoundError(
            f"workflow variable 'config': file {settings.config} does not exist"
        )
    for label, path in (("new_bundle", settings.new_bundle), ("new_bundle", settings.metrics)):
        if path.exists():
            raise FileExistsError(
                f"workflow variable '{label}': {path} exists already; delete it or choose another "
                "file name (results are never overwritten)"
            )
    bad = [item for item in settings.settings if "=" not in item]
    if bad:
        raise ValueError(
            f"workflow variable 'extra_settings': {bad[0]!r} is not a key=value setting (e.g. "
            "train.epochs=20)"
        )


def read_metrics(path: Path) -> Any:
    """The evaluate step's JSON report, without its per-image predictions."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the evaluate step has not written its report yet")
    report = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(report, dict):
        report.pop("predictions", None)
    return report


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
