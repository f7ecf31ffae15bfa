"""Unsafe bundles (zip slip, links, duplicates, oversized members) are refused by every command
that reads a bundle, through the one opener in twinvae.runtime.twinvae_bundle."""

from __future__ import annotations

import stat
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from twinvae.cli.main import app
from twinvae.errors import ExportError
from twinvae.knime.testkit import write_mean_intensity_bundle
from twinvae.runtime import twinvae_bundle as tb

runner = CliRunner()

Member = Callable[[zipfile.ZipFile], None]


def _plain(name: str, data: bytes = b"payload") -> Member:
    return lambda archive: archive.writestr(name, data)


def _symlink(name: str, target: str) -> Member:
    def write(archive: zipfile.ZipFile) -> None:
        info = zipfile.ZipInfo(name)
        info.create_system = 3  # Unix: the high 16 bits of external_attr are st_mode
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(info, target)

    return write


def _twice(name: str) -> Member:
    def write(archive: zipfile.ZipFile) -> None:
        with pytest.warns(UserWarning, match="Duplicate name"):
            archive.writestr(name, b"second copy")

    return write


# (case id, extra member, the member name the error must quote, why)
UNSAFE = [
    ("parent", _plain("../evil.txt"), "../evil.txt", "'..' leads out of the bundle"),
    ("nested-parent", _plain("docs/../../evil.txt"), "docs/../../evil.txt", "'..'"),
    ("absolute", _plain("/tmp/evil.txt"), "/tmp/evil.txt", "absolute path"),
    ("backslash", _plain("..\\evil.txt"), "..\\evil.txt", "backslash"),
    ("drive", _plain("C:/evil.txt"), "C:/evil.txt", "drive letter"),
    ("link", _symlink("weights_link.onnx", "/etc/passwd"), "weights_link.onnx", "symbolic link"),
    ("duplicate", _twice("weights.onnx"), "weights.onnx", "occurs twice"),
    ("case", _plain("RDF.yaml"), "RDF.yaml", "differing in case"),
]


def unsafe_bundle(folder: Path, member: Member, name: str = "unsafe.zip") -> Path:
    """A working mean-intensity bundle with one more, unsafe member."""
    path = write_mean_intensity_bundle(folder / name)
    with zipfile.ZipFile(path, "a") as archive:
        member(archive)
    return path


def _assert_names_bundle_and_member(message: str, bundle: Path, member: str, why: str) -> None:
    assert str(bundle) in message, message
    assert repr(member) in message, message
    assert why in message, message


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two labelled images (generic layout with counts.csv)."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    for index, value in enumerate((40, 200)):
        Image.fromarray(np.full((128, 128), value, dtype=np.uint8)).save(folder / f"{index}.png")
    (folder / "counts.csv").write_text("filename,count\n0.png,1\n1.png,8\n", encoding="utf-8")
    return folder


# -- the opener -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("case", "member", "quoted", "why"), UNSAFE, ids=[u[0] for u in UNSAFE])
def test_opener_refuses_unsafe_members(
    tmp_path: Path, case: str, member: Member, quoted: str, why: str
) -> None:
    bundle = unsafe_bundle(tmp_path, member)
    with pytest.raises(tb.BundleError) as caught:
        tb.open_bundle(bundle)
    _assert_names_bundle_and_member(str(caught.value), bundle, quoted, why)
    with pytest.raises(tb.BundleError):
        tb.BundlePredictor(bundle)


def test_opener_bounds_sizes_and_file_counts(tmp_path: Path) -> None:
    bundle = unsafe_bundle(tmp_path, _plain("big.bin", b"\0" * 5000))
    with pytest.raises(tb.BundleError, match=r"'big.bin': 5000 bytes, more than the 4096"):
        tb.open_bundle(bundle, tb.BundleLimits(max_file_bytes=4096))
    with pytest.raises(tb.BundleError, match="add up to more than the 6000 bytes"):
        tb.open_bundle(bundle, tb.BundleLimits(max_total_bytes=6000))
    with pytest.raises(tb.BundleError, match="more than 2 files"):
        tb.open_bundle(bundle, tb.BundleLimits(max_files=2))
    with tb.open_bundle(bundle) as files:  # within the default limits
        assert sorted(files.names) == ["big.bin", "rdf.yaml", "weights.onnx"]


def test_opener_accepts_plain_bundles_and_reads_only_their_files(tmp_path: Path) -> None:
    bundle = unsafe_bundle(tmp_path, _plain("docs/notes.md"))
    with tb.open_bundle(bundle) as files:
        assert files.prefix == "" and files.read("./docs/notes.md") == b"payload"
        for name, message in [
            ("../rdf.yaml", "'..'"),
            ("/etc/passwd", "absolute path"),
            ("https://example.org/w.onnx", "is a URL"),
            ("missing.onnx", "has no file 'missing.onnx'"),
        ]:
            with pytest.raises(tb.BundleError, match=message):
                files.read(name)
    # rdf.yaml inside the zip's only folder (a zipped bundle folder) is found there
    nested = tmp_path / "nested.zip"
    with zipfile.ZipFile(bundle) as source, zipfile.ZipFile(nested, "w") as target:
        for name in source.namelist():
            target.writestr(f"model/{name}", source.read(name))
    with tb.open_bundle(nested) as files:
        assert files.prefix == "model/" and "weights.onnx" in files.names
    assert tb.read_bundle_info(nested).onnx_file == "weights.onnx"


def test_folder_bundle_with_a_link_is_refused(tmp_path: Path) -> None:
    bundle = write_mean_intensity_bundle(tmp_path / "model.zip")
    folder = tmp_path / "unpacked"
    with zipfile.ZipFile(bundle) as archive:
        archive.extractall(folder)
    assert tb.read_bundle_info(folder).input_id == "raw"
    (tmp_path / "secret.txt").write_text("outside the bundle")
    (folder / "notes.txt").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(tb.BundleError, match=r"refusing member 'notes.txt': symbolic link"):
        tb.open_bundle(folder)


# -- every command that reads a bundle ------------------------------------------------------------

COMMAND_CASES = [UNSAFE[0], UNSAFE[3], UNSAFE[5], UNSAFE[6]]  # .., backslash, link, duplicate


@pytest.mark.parametrize(
    ("case", "member", "quoted", "why"), COMMAND_CASES, ids=[c[0] for c in COMMAND_CASES]
)
def test_predict_refuses_unsafe_bundles(
    tmp_path: Path, images: Path, case: str, member: Member, quoted: str, why: str
) -> None:
    bundle = unsafe_bundle(tmp_path, member)
    out = tmp_path / "counts.csv"
    result = runner.invoke(app, ["predict", str(bundle), str(images), "--out", str(out)])
    assert result.exit_code == 1 and isinstance(result.exception, ExportError), result.output
    _assert_names_bundle_and_member(str(result.exception), bundle, quoted, why)
    assert not out.exists()


@pytest.mark.parametrize(
    ("case", "member", "quoted", "why"), COMMAND_CASES, ids=[c[0] for c in COMMAND_CASES]
)
def test_evaluate_refuses_unsafe_bundles(
    tmp_path: Path, images: Path, case: str, member: Member, quoted: str, why: str
) -> None:
    bundle = unsafe_bundle(tmp_path, member)
    result = runner.invoke(app, ["evaluate", str(bundle), "--data", str(images)])
    assert result.exit_code == 1 and isinstance(result.exception, ExportError), result.output
    _assert_names_bundle_and_member(str(result.exception), bundle, quoted, why)


@pytest.mark.parametrize(
    ("case", "member", "quoted", "why"), COMMAND_CASES, ids=[c[0] for c in COMMAND_CASES]
)
def test_knime_build_refuses_unsafe_bundles(
    tmp_path: Path, case: str, member: Member, quoted: str, why: str
) -> None:
    bundle = unsafe_bundle(tmp_path, member)
    out = tmp_path / "workflows"
    result = runner.invoke(app, ["knime", "build", "--out", str(out), "--bundle", str(bundle)])
    assert result.exit_code == 1 and isinstance(result.exception, ExportError), result.output
    _assert_names_bundle_and_member(str(result.exception), bundle, quoted, why)
    assert not out.exists()  # nothing shipped, not even an empty folder


@pytest.mark.parametrize(
    ("case", "member", "quoted", "why"), COMMAND_CASES, ids=[c[0] for c in COMMAND_CASES]
)
def test_validate_refuses_unsafe_bundles(
    tmp_path: Path, case: str, member: Member, quoted: str, why: str
) -> None:
    bundle = unsafe_bundle(tmp_path, member)
    result = runner.invoke(app, ["validate", str(bundle), "--no-progress"])
    assert result.exit_code == 1, result.output
    output = " ".join(result.output.split())
    assert "Invalid bundle" in output and why in output and "package" in output


def test_the_commands_still_run_a_safe_bundle(tmp_path: Path, images: Path) -> None:
    bundle = write_mean_intensity_bundle(tmp_path / "model.zip")
    out = tmp_path / "counts.csv"
    predicted = runner.invoke(app, ["predict", str(bundle), str(images), "--out", str(out)])
    assert predicted.exit_code == 0, predicted.output
    counts = [float(line.split(",")[1]) for line in out.read_text().splitlines()[1:]]
    np.testing.assert_allclose(counts, [10 * 40 / 255, 10 * 200 / 255], rtol=1e-4)
    evaluated = runner.invoke(app, ["evaluate", str(bundle), "--data", str(images)])
    assert evaluated.exit_code == 0, evaluated.output
    built = runner.invoke(
        app, ["knime", "build", "--out", str(tmp_path / "wf"), "--bundle", str(bundle)]
    )
    assert built.exit_code == 0, built.output
    shipped = tmp_path / "wf" / "TwinVAE_Count_Cells" / "data" / "model.zip"
    assert shipped.read_bytes() == bundle.read_bytes()
