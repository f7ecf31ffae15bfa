"""The package's layering, checked on every import statement (module level and inside functions).

Lower layers never import higher ones: the models know nothing of training or the CLI, the data
readers nothing of models, training or the CLI, and no library module imports the CLI.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "twinvae"

FORBIDDEN: dict[str, set[str]] = {
    "models": {"training", "cli", "accel", "export", "experiments", "protocols", "evaluation"},
    "accel": {"training", "cli", "export", "experiments", "protocols", "evaluation"},
    "data": {"models", "accel", "training", "cli", "export", "experiments", "protocols"},
    "runtime": {"*"},  # copied into KNIME workflows: numpy + onnxruntime only
}
"""Subpackage -> the twinvae subpackages it must not import ("*": none at all)."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every twinvae import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.append((node.lineno, module))
    return [(line, name) for line, name in found if name.split(".")[0] == "twinvae"]


def _violations() -> list[str]:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        layer = _module_name(path).split(".")[1] if "." in _module_name(path) else ""
        for line, name in _imported(path):
            target = name.split(".")[1] if "." in name else ""
            where = f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}"
            if target == "cli" and layer != "cli":
                problems.append(f"{where} (only the CLI may import twinvae.cli)")
                continue
            forbidden = FORBIDDEN.get(layer, set())
            if target != layer and ("*" in forbidden or target in forbidden):
                problems.append(f"{where} (twinvae.{layer} must not import twinvae.{target})")
    return problems


def test_no_layer_imports_a_higher_one() -> None:
    assert _violations() == []


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from twinvae.cli.common import console\n", "only the CLI"),
        ("def f():\n    from twinvae.training import trainer\n", "import twinvae.training"),
        ("from ..training.trainer import train\n", "must not import twinvae.training"),
    ],
)
def test_the_contract_sees_a_violation(
    source: str, expected: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The checker itself: a models module with a forbidden import is reported."""
    fake_package = tmp_path / "twinvae"
    (fake_package / "models").mkdir(parents=True)
    (fake_package / "models" / "bad.py").write_text(source, encoding="utf-8")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake_package)
    problems = _violations()
    assert len(problems) == 1
    assert expected in problems[0]
    assert "models/bad.py:" in problems[0]
