"""The generated KNIME workflows: file format, graph, determinism and the node scripts at work."""

from __future__ import annotations

import ast
import json
import math
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from twinvae.cli.main import app
from twinvae.errors import TwinVAEError
from twinvae.knime import builders
from twinvae.knime.scripts import twinvae_finetune
from twinvae.knime.testkit import (
    run_node_script,
    write_mean_intensity_bundle,
    write_synthetic_time_lapse,
)
from twinvae.knime.workflow import Connection, PythonScriptNode, Workflow, read_files
from twinvae.knime.xmlconfig import Config, Entry, from_xml
from twinvae.runtime import twinvae_bundle

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "knime_workflows"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Top-level keys of a Python Script node's settings.xml as KNIME 5.2 saves a node that has not been
# executed (node container, single node container, native node container, node persistors).
SETTINGS_SKELETON = [
    ("node_file", "xstring"),
    ("flow_stack", "config"),
    ("internal_node_subsettings", "config"),
    ("model", "config"),
    ("nodeAnnotation", "config"),
    ("customDescription", "xstring"),
    ("state", "xstring"),
    ("factory", "xstring"),
    ("node-name", "xstring"),
    ("node-bundle-name", "xstring"),
    ("node-bundle-symbolic-name", "xstring"),
    ("node-bundle-vendor", "xstring"),
    ("node-bundle-version", "xstring"),
    ("node-feature-name", "xstring"),
    ("node-feature-symbolic-name", "xstring"),
    ("node-feature-vendor", "xstring"),
    ("node-feature-version", "xstring"),
    ("factory_settings", "config"),
    ("node_creation_config", "config"),
    ("name", "xstring"),
    ("hasContent", "xboolean"),
    ("isInactive", "xboolean"),
    ("ports", "config"),
    ("filestores", "config"),
]
MODEL_SKELETON = [("script", "xstring"), ("python3_command", "xstring")]
PORT_GROUPS = [
    "Input object (pickled)",
    "Input table",
    "Output table",
    "Output image",
    "Output object (pickled)",
]
ANNOTATION_SKELETON = [
    "text", "contentType", "bgcolor", "x-coordinate", "y-coordinate", "width", "height",
    "alignment", "borderSize", "borderColor", "defFontSize", "annotation-version", "styles",
]  # fmt: skip
WORKFLOW_SKELETON = [
    "created_by", "created_by_nightly", "version", "name", "authorInformation",
    "customDescription", "state", "workflow_variables", "workflow_credentials", "annotations",
    "nodes", "connections", "workflow_editor_settings",
]  # fmt: skip
NODE_ENTRY_SKELETON = [
    "id",
    "node_settings_file",
    "node_is_meta",
    "node_type",
    "ui_classname",
    "ui_settings",
]
CONNECTION_SKELETON = [
    "sourceID",
    "destID",
    "sourcePort",
    "destPort",
    "ui_classname",
    "ui_settings",
]
PYTHON_FACTORY = "org.knime.python3.scripting.nodes2.script.PythonScriptNodeFactory"


def skeleton(config: Config) -> list[tuple[str, str]]:
    return [
        (child.key, child.type if isinstance(child, Entry) else "config")
        for child in config.children
    ]


def settings_of(workflow: Path) -> dict[int, Config]:
    root = from_xml((workflow / "workflow.knime").read_bytes())
    result = {}
    for node in root.config("nodes").children:
        assert isinstance(node, Config)
        result[int(node.value("id") or 0)] = from_xml(
            (workflow / str(node.value("node_settings_file"))).read_bytes()
        )
    return result


def script_of(workflow: Path, node_id: int) -> str:
    script = settings_of(workflow)[node_id].config("model").value("script")
    assert script
    return script


def variables_of(workflow: Path) -> dict[str, object]:
    root = from_xml((workflow / "workflow.knime").read_bytes())
    variables: dict[str, object] = {}
    for var in root.config("workflow_variables").children:
        assert isinstance(var, Config)
        kind, value = var.value("class"), var.value("value")
        variables[str(var.value("name"))] = (
            int(value or 0)
            if kind == "INTEGER"
            else float(value or 0)
            if kind == "DOUBLE"
            else value
        )
    return variables


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Workflows built with a tiny bundle and five sample images."""
    base = tmp_path_factory.mktemp("knime")
    bundle = write_mean_intensity_bundle(base / "model.zip")
    samples = base / "samples"
    samples.mkdir()
    rng = np.random.default_rng(4)
    Image.fromarray(rng.integers(0, 256, (128, 128), dtype=np.uint8)).save(samples / "a.png")
    Image.fromarray(np.full((128, 128, 3), 90, dtype=np.uint8)).save(samples / "b_rgb.png")
    Image.fromarray(np.full((100, 140), 200, dtype=np.uint8)).save(samples / "c_small.jpg")
    (samples / "sub").mkdir()
    Image.fromarray(np.zeros((128, 128), dtype=np.uint8)).save(samples / "sub" / "d.tif")
    out = base / "out"
    builders.build_workflows(out, bundle=bundle, samples=samples)
    return out


# -- file format ----------------------------------------------------------------------------------


def test_every_file_follows_the_knime_formats(built: Path) -> None:
    for name in builders.WORKFLOW_NAMES:
        workflow = built / name
        root = from_xml((workflow / "workflow.knime").read_bytes())  # validates XMLConfig rules
        assert root.key == "workflow.knime"
        keys = root.keys()
        assert [key for key in WORKFLOW_SKELETON if key in keys] == keys
        assert root.value("version") == "5.1.0" and root.value("name") is None
        for config in settings_of(workflow).values():
            assert config.key == "settings.xml"
        meta = ET.parse(workflow / "workflow-metadata.xml").getroot()
        namespace = "{http://www.knime.org/core/node/workflow/metadata/v1.0}"
        assert meta.tag == f"{namespace}workflow-metadata"
        assert [child.tag.removeprefix(namespace) for child in meta] == [
            "author", "created", "last-modified", "description", "tags", "links",
        ]  # fmt: skip
        assert "twinvae" in [tag.text for tag in meta.iter(f"{namespace}tag")]
        assert all(
            link.get("href", "").startswith("https://") for link in meta.iter(f"{namespace}link")
        )
        legacy = ET.parse(workflow / "workflowset.meta").getroot()
        assert legacy.tag == "{http://www.knime.org/2.9/metainfo}KNIMEMetaInfo"
        assert legacy.get("nrOfElements") == str(len(legacy))


def test_node_settings_have_the_structure_of_a_knime_save(built: Path) -> None:
    for name in builders.WORKFLOW_NAMES:
        for node_id, config in settings_of(built / name).items():
            assert skeleton(config) == SETTINGS_SKELETON, f"{name} node {node_id}"
            assert skeleton(config.config("model")) == MODEL_SKELETON
            assert config.value("factory") == PYTHON_FACTORY
            assert config.value("node-name") == "Python Script"
            assert config.value("node-bundle-symbolic-name") == "org.knime.python3.scripting.nodes"
            assert (
                config.value("node-feature-symbolic-name")
                == "org.knime.features.python3.scripting.feature.group"
            )
            assert config.value("customDescription") is None
            assert config.value("state") == "IDLE" and config.value("hasContent") == "false"
            assert (
                config.config("internal_node_subsettings").value("memory_policy")
                == "CacheSmallInMemory"
            )
            assert [
                key for key, _ in skeleton(config.config("nodeAnnotation"))
            ] == ANNOTATION_SKELETON
            creation = config.config("node_creation_config")
            assert creation.keys() == PORT_GROUPS
            for group in creation.children:
                assert isinstance(group, Config)
                for port in group.children:
                    assert isinstance(port, Config) and port.keys() == ["object_class"]
            assert creation.config("Input object (pickled)").children == []
            assert creation.config("Output object (pickled)").children == []
            filestores = config.config("filestores")
            assert filestores.keys() == ["file_store_location", "file_store_id"]


def test_workflow_graph_is_consistent(built: Path) -> None:
    for name in builders.WORKFLOW_NAMES:
        workflow = built / name
        root = from_xml((workflow / "workflow.knime").read_bytes())
        nodes = {}
        for node in root.config("nodes").children:
            assert isinstance(node, Config) and node.keys() == NODE_ENTRY_SKELETON
            node_id = int(node.value("id") or 0)
            assert node.key == f"node_{node_id}" and node_id not in nodes
            settings_file = workflow / str(node.value("node_settings_file"))
            assert (
                settings_file.is_file()
                and settings_file.parent.name == f"Python Script (#{node_id})"
            )
            bounds = node.config("ui_settings").config("extrainfo.node.bounds")
            assert bounds.value("array-size") == "4"
            nodes[node_id] = from_xml(settings_file.read_bytes()).config("node_creation_config")
        inputs_used = set()
        for connection in root.config("connections").children:
            assert isinstance(connection, Config) and connection.keys() == CONNECTION_SKELETON
            source, dest = (
                int(connection.value("sourceID") or 0),
                int(connection.value("destID") or 0),
            )
            source_port = int(connection.value("sourcePort") or 0)
            dest_port = int(connection.value("destPort") or 0)
            tables_out = len(nodes[source].config("Output table").children)
            tables_in = len(nodes[dest].config("Input table").children)
            assert 1 <= source_port <= tables_out, (
                f"{name}: {source}:{source_port} is no table output"
            )
            assert 1 <= dest_port <= tables_in, f"{name}: {dest}:{dest_port} is no table input"
            assert (dest, dest_port) not in inputs_used
            inputs_used.add((dest, dest_port))
        expected = {
            (node, port)
            for node, c in nodes.items()
            for port in range(1, len(c.config("Input table").children) + 1)
        }
        assert inputs_used == expected, f"{name}: every input port is connected exactly once"
        for node_id, creation in nodes.items():
            outputs = len(creation.config("Output table").children) + len(
                creation.config("Output image").children
            )
            ports = settings_of(workflow)[node_id].config("ports")
            assert ports.keys() == [f"port_{i}" for i in range(1, outputs + 1)]


def test_annotations_explain_each_step(built: Path) -> None:
    for name in builders.WORKFLOW_NAMES:
        root = from_xml((built / name / "workflow.knime").read_bytes())
        annotations = root.config("annotations").children
        node_count = len(root.config("nodes").children)
        assert len(annotations) == node_count + 1  # a title box plus one box per step
        texts = [a.value("text") for a in annotations if isinstance(a, Config)]
        assert all(text and len(text) > 40 for text in texts)
        for step in range(1, node_count + 1):
            assert any(str(text).startswith(f"{step}. ") for text in texts)


def _shipped_per_function(module_source: str) -> dict[str, set[str]]:
    """For each function of twinvae_knime, the modules it imports via shipped("..."), also
    through the module's other functions it calls."""
    tree = ast.parse(module_source)
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    direct: dict[str, set[str]] = {}
    calls: dict[str, set[str]] = {}
    for name, function in functions.items():
        direct[name], calls[name] = set(), set()
        for node in ast.walk(function):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                if node.func.id == "shipped" and isinstance(node.args[0], ast.Constant):
                    direct[name].add(str(node.args[0].value))
                elif node.func.id in functions:
                    calls[name].add(node.func.id)
    closure = {name: set(modules) for name, modules in direct.items()}
    changed = True
    while changed:
        changed = False
        for name, callees in calls.items():
            for callee in callees:
                if not closure[callee] <= closure[name]:
                    closure[name] |= closure[callee]
                    changed = True
    return closure


def test_each_workflow_ships_only_the_modules_its_nodes_use(built: Path) -> None:
    expected = {
        builders.COUNT_WORKFLOW: {"twinvae_knime", "twinvae_bundle"},
        builders.GROWTH_WORKFLOW: {"twinvae_knime", "twinvae_bundle", "twinvae_growth"},
        builders.FINETUNE_WORKFLOW: {"twinvae_knime", "twinvae_bundle", "twinvae_finetune"},
    }
    runtime_source = Path(twinvae_bundle.__file__).read_bytes()
    for name, modules in expected.items():
        data = built / name / "data"
        assert {path.stem for path in data.glob("*.py")} == modules, name
        logic = (data / "twinvae_knime.py").read_text(encoding="utf-8")
        needs = _shipped_per_function(logic)
        used: set[str] = {"twinvae_knime"}
        for node_script in settings_of(built / name).values():
            script = node_script.config("model").value("script") or ""
            tree = ast.parse(script)
            imported = {
                alias.name
                for node in ast.walk(tree)
                if isinstance(node, ast.Import)
                for alias in node.names
            }
            assert imported <= {"sys", "knime.scripting.io", "twinvae_knime"}, imported
            for node in ast.walk(tree):
                if (
                    isinstance(node, ast.Attribute)
                    and isinstance(node.value, ast.Name)
                    and node.value.id == "tk"
                ):
                    used |= needs.get(node.attr, set())
        assert used == modules, f"{name}: its nodes use {sorted(used)}"
        if "twinvae_bundle" in modules:  # the very runner twinvae predict uses
            assert (data / "twinvae_bundle.py").read_bytes() == runtime_source


def test_workflows_link_the_papers_the_bundles_cite(built: Path) -> None:
    from twinvae.export.rdf import CITATIONS

    for name in builders.WORKFLOW_NAMES:
        metadata = (built / name / "workflow-metadata.xml").read_text(encoding="utf-8")
        for citation in CITATIONS:
            assert f"https://doi.org/{citation['doi']}" in metadata, name
        assert "btab208" not in metadata and "08124-7" not in metadata  # the old, wrong DOIs


def test_committed_workflows_equal_a_fresh_build(tmp_path: Path) -> None:
    if not COMMITTED.is_dir():
        pytest.skip("knime_workflows/ is not part of this checkout")
    builders.build_workflows(tmp_path)
    for name in builders.WORKFLOW_NAMES:
        fresh = read_files(tmp_path / name)
        committed = read_files(COMMITTED / name, skip=["__pycache__"])
        assert committed.keys() == fresh.keys(), f"{name}: regenerate with 'twinvae knime build'"
        changed = [path for path in fresh if fresh[path] != committed[path]]
        assert not changed, (
            f"{name}: {changed} differ; run 'twinvae knime build --out knime_workflows --overwrite'"
        )
    assert not any(COMMITTED.glob("*.knwf")) or not any(COMMITTED.glob("*/data/model.zip"))


def test_builds_are_byte_identical_and_knwf_has_one_top_folder(tmp_path: Path, built: Path) -> None:
    bundle = built / builders.COUNT_WORKFLOW / "data" / "model.zip"
    samples = built / builders.COUNT_WORKFLOW / "data" / "samples"
    for target in ("one", "two"):
        builders.build_workflows(tmp_path / target, bundle=bundle, samples=samples)
    first, second = read_files(tmp_path / "one"), read_files(tmp_path / "two")
    assert first.keys() == second.keys() and all(first[key] == second[key] for key in first)
    for name in builders.WORKFLOW_NAMES:
        with zipfile.ZipFile(tmp_path / "one" / f"{name}.knwf") as archive:
            names = archive.namelist()
            assert {entry.split("/")[0] for entry in names} == {name}
            assert names == sorted(names)
            assert all(info.date_time == (2024, 1, 1, 0, 0, 0) for info in archive.infolist())
            assert (
                archive.read(f"{name}/workflow.knime")
                == (tmp_path / "one" / name / "workflow.knime").read_bytes()
            )
    count_files = first.keys()
    assert f"{builders.COUNT_WORKFLOW}/data/model.zip" in count_files
    assert f"{builders.COUNT_WORKFLOW}/data/samples/sub/d.tif" in count_files


def test_cli_build_refuses_to_overwrite(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["knime", "build", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert all((tmp_path / name / "workflow.knime").is_file() for name in builders.WORKFLOW_NAMES)
    assert not list(tmp_path.glob("*.knwf"))  # archives only with a bundle or --knwf
    again = runner.invoke(app, ["knime", "build", "--out", str(tmp_path)])
    assert isinstance(again.exception, TwinVAEError) and "--overwrite" in str(again.exception)
    forced = runner.invoke(app, ["knime", "build", "--out", str(tmp_path), "--overwrite", "--knwf"])
    assert forced.exit_code == 0 and len(list(tmp_path.glob("*.knwf"))) == 3
    help_text = runner.invoke(app, ["knime", "build", "--help"]).output
    for option in ("--bundle", "--samples", "--out", "--overwrite"):
        assert option in help_text


def test_build_rejects_bad_bundles_and_sample_folders(tmp_path: Path) -> None:
    (tmp_path / "bad.zip").write_bytes(b"no zip")
    with pytest.raises(TwinVAEError, match="not a zip archive"):
        builders.build_workflows(tmp_path / "out", bundle=tmp_path / "bad.zip")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TwinVAEError, match="holds no images"):
        builders.build_workflows(tmp_path / "out", samples=tmp_path / "empty")


# -- the node scripts at work ---------------------------------------------------------------------


def test_count_workflow_counts_equal_the_bundle_predictor(built: Path) -> None:
    workflow = built / builders.COUNT_WORKFLOW
    variables = variables_of(workflow)
    assert variables == {
        "image_folder": "knime://knime.workflow/data/samples",
        "bundle": "knime://knime.workflow/data/model.zip",
        "batch_size": 64,
        "results_csv": "",
        "overwrite_results": 0,
    }
    listing = run_node_script(
        script_of(workflow, 1), workflow, output_tables=1, flow_variables=variables
    )
    images = listing.output_tables[0]
    assert images is not None
    assert list(images["file"]) == ["a.png", "b_rgb.png", "c_small.jpg", "sub/d.tif"]
    csv = workflow.parent / "results" / "counts.csv"
    counted = run_node_script(
        script_of(workflow, 2),
        workflow,
        [images],
        output_tables=1,
        flow_variables=variables | {"results_csv": str(csv)},
    )
    table = counted.output_tables[0]
    assert table is not None
    assert list(table.columns) == ["file", "count", "count_rounded", "thumbnail"]
    predictor = twinvae_bundle.BundlePredictor(workflow / "data" / "model.zip")
    reference = predictor.predict_files(list(images["path"]))
    np.testing.assert_array_equal(table["count"].to_numpy(), [count for _, count in reference])
    stack = predictor.read_images(list(images["path"]))
    np.testing.assert_allclose(
        table["count"], 10 * stack.astype(np.float64).mean(axis=(1, 2)) / 255, rtol=1e-4
    )
    assert table["count"].iloc[1] == pytest.approx(10 * 90 / 255, rel=1e-4)  # RGB -> grey
    assert table["count"].iloc[2] == pytest.approx(10 * 200 / 255, rel=1e-4)  # resized
    assert list(table["count_rounded"]) == [math.floor(c + 0.5) for c in table["count"]]
    assert all(isinstance(t, Image.Image) and t.size == (64, 64) for t in table["thumbnail"])
    saved = pd.read_csv(csv)
    assert list(saved.columns) == ["file", "count", "count_rounded"]
    np.testing.assert_allclose(saved["count"], table["count"], rtol=1e-6)
    with pytest.raises(FileExistsError, match="overwrite_results"):
        run_node_script(
            script_of(workflow, 2),
            workflow,
            [images],
            output_tables=1,
            flow_variables=variables | {"results_csv": str(csv)},
        )
    histogram = run_node_script(
        script_of(workflow, 3), workflow, [table], output_images=1, flow_variables=variables
    )
    assert histogram.output_images[0] is not None and histogram.output_images[0].startswith(
        PNG_SIGNATURE
    )
    old_knime = run_node_script(
        script_of(workflow, 2),
        workflow,
        [images],
        output_tables=1,
        flow_variables=variables,
        png_cells=False,
    )
    thumbnails = old_knime.output_tables[0]
    assert thumbnails is not None and all(
        bytes(t).startswith(PNG_SIGNATURE) for t in thumbnails["thumbnail"]
    )


def test_count_workflow_counts_equal_twinvae_predict(built: Path, tmp_path: Path) -> None:
    workflow = built / builders.COUNT_WORKFLOW
    variables = variables_of(workflow)
    listing = run_node_script(
        script_of(workflow, 1), workflow, output_tables=1, flow_variables=variables
    )
    images = listing.output_tables[0]
    assert images is not None
    counted = run_node_script(
        script_of(workflow, 2), workflow, [images], output_tables=1, flow_variables=variables
    )
    table = counted.output_tables[0]
    assert table is not None
    predicted_csv = tmp_path / "predict.csv"
    result = CliRunner().invoke(
        app,
        [
            "predict", str(workflow / "data" / "model.zip"), *map(str, images["path"]),
            "--out", str(predicted_csv), "--resize",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    predicted = pd.read_csv(predicted_csv)
    assert len(predicted) == len(table)
    np.testing.assert_allclose(table["count"], predicted["count"], atol=1e-4)
    assert list(table["count_rounded"]) == list(predicted["count_rounded"])


def test_count_workflow_without_bundle_says_how_to_get_one(tmp_path: Path) -> None:
    builders.build_workflows(tmp_path)
    workflow = tmp_path / builders.COUNT_WORKFLOW
    table = pd.DataFrame({"file": ["x.png"], "path": [str(tmp_path / "x.png")]})
    with pytest.raises(FileNotFoundError, match="twinvae knime build --bundle"):
        run_node_script(
            script_of(workflow, 2),
            workflow,
            [table],
            output_tables=1,
            flow_variables=variables_of(workflow),
        )
    with pytest.raises(ValueError, match="No images"):
        run_node_script(
            script_of(workflow, 1),
            workflow,
            output_tables=1,
            flow_variables={"image_folder": str(tmp_path)},
        )


def test_growth_workflow_finds_the_known_doubling_times(built: Path, tmp_path: Path) -> None:
    workflow = tmp_path / builders.GROWTH_WORKFLOW
    shutil.copytree(built / builders.GROWTH_WORKFLOW, workflow)
    doubling = {1: 8.0, 2: 5.0}  # frames
    write_synthetic_time_lapse(
        workflow / "data" / "time_lapse",
        {pos: math.log(2) / d for pos, d in doubling.items()},
        frames=16,
    )
    variables = variables_of(workflow) | {
        "frame_interval_minutes": 10.0,
        "results_csv": "knime://knime.workflow/data/results/growth.csv",
    }
    frames = run_node_script(
        script_of(workflow, 1), workflow, output_tables=1, flow_variables=variables
    ).output_tables[0]
    assert (
        frames is not None
        and len(frames) == 32
        and set(frames["chamber"]) == {"exp1xy01", "exp1xy02"}
    )
    counts = run_node_script(
        script_of(workflow, 2), workflow, [frames], output_tables=1, flow_variables=variables
    ).output_tables[0]
    assert counts is not None and "thumbnail" not in counts.columns
    per_frame = run_node_script(
        script_of(workflow, 3), workflow, [counts], output_tables=1, flow_variables=variables
    ).output_tables[0]
    assert per_frame is not None and list(per_frame.columns) == [
        "chamber",
        "frame",
        "count",
        "images",
    ]
    fit = run_node_script(
        script_of(workflow, 4),
        workflow,
        [per_frame],
        output_tables=1,
        output_images=1,
        flow_variables=variables,
    )
    fits = fit.output_tables[0]
    assert fits is not None
    for position, expected in doubling.items():
        row = fits[fits["chamber"] == f"exp1xy{position:02d}"].iloc[0]
        assert row["doubling_time_frames"] == pytest.approx(expected, rel=0.03)
        assert row["doubling_time_hours"] == pytest.approx(expected * 10 / 60, rel=0.03)
        assert row["rate_per_hour"] == pytest.approx(math.log(2) / (expected * 10 / 60), rel=0.03)
    assert fit.output_images[0] is not None and fit.output_images[0].startswith(PNG_SIGNATURE)
    saved = pd.read_csv(workflow / "data" / "results" / "growth.csv")
    assert list(saved["chamber"]) == ["exp1xy01", "exp1xy02"]
    assert (workflow / "data" / "results" / "growth.png").read_bytes() == fit.output_images[0]


def test_growth_workflow_accepts_a_position_table(built: Path, tmp_path: Path) -> None:
    workflow = built / builders.GROWTH_WORKFLOW
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("first.png", "second.png", "third.png"):
        Image.fromarray(np.full((128, 128), 25, dtype=np.uint8)).save(folder / name)
    (tmp_path / "positions.csv").write_text(
        "file,position,frame\nsecond.png,1,1\nfirst.png,1,0\nthird.png,2,0\n"
    )
    variables = {
        "time_lapse_folder": str(folder),
        "position_table": str(tmp_path / "positions.csv"),
    }
    frames = run_node_script(
        script_of(workflow, 1), workflow, output_tables=1, flow_variables=variables
    ).output_tables[0]
    assert frames is not None
    assert list(frames["file"]) == ["first.png", "second.png", "third.png"]
    assert list(frames["chamber"]) == ["xy01", "xy01", "xy02"]


FAKE_TWINVAE = """#!{python}
import json, shutil, sys
from pathlib import Path
args = sys.argv[1:]
with open({calls!r}, "a") as log:
    log.write(json.dumps(args) + "\\n")
def option(name):
    return args[args.index(name) + 1]
if args[0] == "transfer":
    out = Path(option("--out"))
    out.mkdir(parents=True)
    (out / "best.pt").write_bytes(b"checkpoint")
elif args[0] == "export":
    assert Path(args[1]).is_file(), args[1]
    shutil.copy({bundle!r}, option("--out"))
elif args[0] == "evaluate":
    print("evaluating " + args[1])
    report = {{"overall": {{"mae": 0.75, "n": 3}}, "per_count": {{"1": 0.5}}, "model": "x"}}
    report["predictions"] = [{{"file": "a.png", "count": 1, "predicted": 1.2}}]
    Path(option("--json")).write_text(json.dumps(report))
else:
    sys.exit(2)
"""


def _finetune_copy(built: Path, tmp_path: Path) -> Path:
    workflow = tmp_path / builders.FINETUNE_WORKFLOW
    shutil.copytree(built / builders.FINETUNE_WORKFLOW, workflow)
    for folder in ("new_labels", "heldout_labels"):
        (workflow / "data" / folder).mkdir()
    return workflow


def _run_finetune_nodes(workflow: Path, variables: dict[str, object]) -> tuple[Any, Any, Any]:
    """Nodes 1 to 4 in turn: the plan, the final log, the metrics and the flow variables."""
    plan = run_node_script(
        script_of(workflow, 1), workflow, output_tables=1, flow_variables=variables
    ).output_tables[0]
    assert plan is not None and list(plan["step"]) == ["transfer", "export", "evaluate"]
    assert set(plan["status"]) == {"planned"}
    log = plan
    for node_id in (2, 3):
        result = run_node_script(
            script_of(workflow, node_id), workflow, [log], output_tables=1, flow_variables=variables
        )
        assert result.output_tables[0] is not None
        log = result.output_tables[0]
    final = run_node_script(
        script_of(workflow, 4), workflow, [log], output_tables=2, flow_variables=variables
    )
    log, metrics = final.output_tables
    assert log is not None and metrics is not None and set(log["status"]) == {"done"}
    return plan, metrics, final.flow_variables


def test_finetune_workflow_runs_transfer_export_evaluate(built: Path, tmp_path: Path) -> None:
    """The command lines, with a stand-in twinvae; the built bundle (a stand-in without the
    whole Twin-VAE) is fine-tuned natural-only."""
    workflow = _finetune_copy(built, tmp_path)
    calls = tmp_path / "calls.jsonl"
    fake = tmp_path / "bin" / "twinvae"
    fake.parent.mkdir()
    bundle = workflow / "data" / "model.zip"
    assert (
        bundle.read_bytes() == (built / builders.COUNT_WORKFLOW / "data" / "model.zip").read_bytes()
    )
    fake.write_text(
        FAKE_TWINVAE.format(python=sys.executable, calls=str(calls), bundle=str(bundle))
    )
    fake.chmod(0o755)
    variables = variables_of(workflow) | {
        "twinvae_executable": str(fake),
        "extra_settings": "train.epochs=3; train.batch_size=8",
    }
    _, metrics, flow_variables = _run_finetune_nodes(workflow, variables)
    values = dict(zip(metrics["metric"], metrics["value"], strict=True))
    assert values["overall.mae"] == 0.75 and "per_count.1" in values
    assert not any(name.startswith("predictions") for name in values)
    new_bundle = workflow / "data" / "finetuned_model.zip"
    assert flow_variables["new_bundle_path"] == str(new_bundle.resolve())
    assert twinvae_bundle.read_bundle_info(new_bundle).input_size == (128, 128)
    recorded = [json.loads(line) for line in calls.read_text().splitlines()]
    data = (workflow / "data").resolve()
    assert recorded[0] == [
        "transfer", "--from", str(data / "model.zip"), "--strategy", "thaw",
        "--set", f"data.natural={data / 'new_labels'}", "--set", "data.modality=other",
        "--natural-only", "--set", "train.epochs=3", "--set", "train.batch_size=8",
        "--out", str(data / "finetune_run"),
    ]  # fmt: skip
    assert recorded[1] == [
        "export",
        str(data / "finetune_run" / "best.pt"),
        "--out",
        str(new_bundle.resolve()),
    ]
    assert recorded[2] == [
        "evaluate", str(new_bundle.resolve()), "--data", str(data / "heldout_labels"),
        "--json", str(data / "finetuned_model.metrics.json"),
    ]  # fmt: skip
    with pytest.raises(FileExistsError, match="exists already"):
        run_node_script(script_of(workflow, 1), workflow, output_tables=1, flow_variables=variables)


def test_finetune_plan_names_missing_inputs(built: Path, tmp_path: Path) -> None:
    workflow = _finetune_copy(built, tmp_path)
    (workflow / "data" / "model.zip").unlink()
    with pytest.raises(FileNotFoundError, match="workflow variable 'bundle': no model bundle"):
        run_node_script(
            script_of(workflow, 1), workflow, output_tables=1,
            flow_variables=variables_of(workflow) | {"twinvae_executable": sys.executable},
        )  # fmt: skip


@pytest.mark.slow
def test_finetune_workflow_fine_tunes_a_twinvae_bundle(tmp_path: Path) -> None:
    """The real twinvae under the stand-in knio: the count workflow's bundle (a tiny Twin-VAE
    with its whole weights attached) fine-tuned with the synthetic twin, exported, evaluated."""
    import torch

    from _fine_tune_data import TINY, write_labelled_folder
    from twinvae.config import ExperimentConfig
    from twinvae.export import export_bundle
    from twinvae.models.twin_vae import TwinVAE
    from twinvae.training.checkpoint import Checkpoint, load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    source = tmp_path / "source" / "best.pt"
    source.parent.mkdir()
    config = ExperimentConfig(name="tiny-pc", model=TINY)
    save_checkpoint(Checkpoint(config=config, model_state=TwinVAE(TINY).state_dict()), source)
    bundle = export_bundle(source, tmp_path / "model.zip").path
    out = tmp_path / "workflows"
    builders.build_workflows(out, bundle=bundle, knwf=False)
    workflow = out / builders.FINETUNE_WORKFLOW
    data = workflow / "data"
    write_labelled_folder(data / "new_labels", labelled=12)
    write_labelled_folder(data / "heldout_labels", labelled=40)
    variables = variables_of(workflow) | {
        "modality": "dic",
        "extra_settings": "train.epochs=1 train.steps_per_epoch=2 train.batch_size=4",
    }
    plan, metrics, flow_variables = _run_finetune_nodes(workflow, variables)
    assert "--natural-only" not in plan["command"].iloc[0]  # the bundle holds the whole model
    run = load_checkpoint(data / "finetune_run" / "best.pt")
    assert run.config.data.modality == "dic" and run.config.transfer is not None
    assert run.config.transfer.from_checkpoint == str((data / "model.zip").resolve())
    new_bundle = Path(str(flow_variables["new_bundle_path"]))
    assert twinvae_bundle.has_full_weights(twinvae_bundle.read_bundle_info(new_bundle))
    values = dict(zip(metrics["metric"], metrics["value"], strict=True))
    assert values["overall.n"] == 40 and values["overall.mae"] >= 0


def test_finetune_command_lines_match_the_twinvae_cli() -> None:
    """Every option of COMMANDS exists in the twinvae CLI."""
    runner = CliRunner()
    for name, template in twinvae_finetune.COMMANDS:
        subcommand = template[1]
        probe = runner.invoke(app, [subcommand, "--help"], terminal_width=200)
        assert probe.exit_code == 0, f"'twinvae {subcommand} --help' failed for step {name}"
        optional = twinvae_finetune.OPTIONAL_FLAGS if name == "transfer" else ()
        for token in (*template[2:], *optional):
            if token.startswith("--"):
                assert token in probe.output, f"twinvae {subcommand} has no option {token}"


@pytest.mark.skipif(
    "KNIME_EXEC" not in os.environ, reason="set KNIME_EXEC to a KNIME executable to run"
)
def test_workflows_run_in_knime_batch_mode(built: Path, tmp_path: Path) -> None:
    executable = os.environ["KNIME_EXEC"]
    base = [executable, "-nosplash", "-application", "org.knime.product.KNIME_BATCH_APPLICATION"]
    if os.environ.get("KNIME_PREFERENCES"):
        base.append(f"-preferences={os.environ['KNIME_PREFERENCES']}")
    count_archive = built / f"{builders.COUNT_WORKFLOW}.knwf"
    count = subprocess.run(
        [*base, f"-workflowFile={count_archive}", "-reset", "-nosave"],
        capture_output=True, text=True, timeout=1800, check=False,
    )  # fmt: skip
    assert count.returncode == 0, count.stdout[-3000:] + count.stderr[-3000:]
    growth = tmp_path / builders.GROWTH_WORKFLOW
    shutil.copytree(built / builders.GROWTH_WORKFLOW, growth)
    write_synthetic_time_lapse(growth / "data" / "time_lapse", {1: 0.1, 2: 0.15}, frames=12)
    archive = tmp_path / f"{builders.GROWTH_WORKFLOW}.knwf"
    builders.write_knwf(read_files(growth), builders.GROWTH_WORKFLOW, archive)
    result = subprocess.run(
        [*base, f"-workflowFile={archive}", "-reset", "-nosave"],
        capture_output=True, text=True, timeout=1800, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_workflow_check_rejects_inconsistent_graphs() -> None:
    source = PythonScriptNode(1, "a", "pass", 0, 0, output_tables=1, output_images=1)
    sink = PythonScriptNode(2, "b", "pass", 100, 0, input_tables=1)

    def workflow(nodes: list[PythonScriptNode], connections: list[Connection]) -> Workflow:
        return Workflow("w", "t", "d", [], [], "me", nodes, connections)

    workflow([source, sink], [Connection(1, 1, 2, 1)]).check()
    with pytest.raises(ValueError, match="duplicate node ids"):
        workflow([source, source], []).check()
    with pytest.raises(ValueError, match="image port"):
        workflow([source, sink], [Connection(1, 2, 2, 1)]).check()
    with pytest.raises(ValueError, match="missing port"):
        workflow([source, sink], [Connection(1, 1, 2, 2)]).check()
    with pytest.raises(ValueError, match="open"):
        workflow([source, sink], []).check()
    with pytest.raises(ValueError, match="unknown node"):
        workflow([source, sink], [Connection(1, 1, 3, 1)]).check()
