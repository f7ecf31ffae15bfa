"""Write KNIME workflow folders (workflow.knime, node settings, metadata) and .knwf archives.

The files follow what KNIME Analytics Platform 5.2 writes when it saves a workflow that holds
Python Script nodes: ``workflow.knime`` (format version 5.1.0) with nodes, connections, UI bounds,
workflow annotations, workflow variables and author information; one ``settings.xml`` per node
folder ``<Node name> (#<id>)``; ``workflow-metadata.xml`` (the 5.1+ metadata) and the legacy
``workflowset.meta`` that KNIME still writes next to it. Everything is deterministic: the same
inputs give the same bytes, including the zip archives.
"""

from __future__ import annotations

import io
import shutil
import stat
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape as xml_text
from xml.sax.saxutils import quoteattr

from twinvae.knime.xmlconfig import Config, to_xml

CREATED_BY = "5.2.0.v202311290613"
WORKFLOW_FORMAT_VERSION = "5.1.0"
FIXED_TIMESTAMP = "2024-01-01 00:00:00 +0000"
FIXED_ISO_TIMESTAMP = "2024-01-01T00:00:00.000Z"
ZIP_TIMESTAMP = (2024, 1, 1, 0, 0, 0)

BUFFERED_DATA_TABLE = "org.knime.core.node.BufferedDataTable"
IMAGE_PORT_OBJECT = "org.knime.core.node.port.image.ImagePortObject"
PICKLED_OBJECT = "org.knime.python2.port.PickledObjectFileStorePortObject"

NODE_UI_CLASS = "org.knime.core.node.workflow.NodeUIInformation"
CONNECTION_UI_CLASS = "org.knime.core.node.workflow.ConnectionUIInformation"
NODE_WIDTH = 75
NODE_HEIGHT = 80


@dataclass(frozen=True)
class NativeNodeType:
    """Factory, bundle and feature of a KNIME node implementation."""

    factory: str
    node_name: str
    bundle_name: str
    bundle_symbolic_name: str
    bundle_vendor: str
    bundle_version: str
    feature_name: str
    feature_symbolic_name: str
    feature_vendor: str
    feature_version: str


# The "Python Script" node of KNIME 5.2+ (knime.scripting.io API, UI-extension dialog).
PYTHON_SCRIPT_NODE = NativeNodeType(
    factory="org.knime.python3.scripting.nodes2.script.PythonScriptNodeFactory",
    node_name="Python Script",
    bundle_name="KNIME Python 3 - Scripting Nodes",
    bundle_symbolic_name="org.knime.python3.scripting.nodes",
    bundle_vendor="KNIME AG, Zurich, Switzerland",
    bundle_version="5.2.0",
    feature_name="KNIME Python Integration",
    feature_symbolic_name="org.knime.features.python3.scripting.feature.group",
    feature_vendor="KNIME AG, Zurich, Switzerland",
    feature_version="5.2.0",
)

# Port groups of the Python Script node factory, in the order that defines port indices.
PYTHON_INPUT_GROUPS = ("Input object (pickled)", "Input table")
PYTHON_OUTPUT_GROUPS = ("Output table", "Output image", "Output object (pickled)")


@dataclass(frozen=True)
class Annotation:
    """A workflow annotation (a text box on the canvas) or a node label."""

    text: str
    x: int = 0
    y: int = 0
    width: int = 0
    height: int = 0
    background: int = 0xFFFFFF
    border_color: int = 0xFFFFFF
    border_size: int = 0
    font_size: int = -1
    alignment: str = "LEFT"


@dataclass(frozen=True)
class PythonScriptNode:
    """A Python Script node: its script, its ports, its label and its position."""

    node_id: int
    label: str
    script: str
    x: int
    y: int
    input_tables: int = 0
    output_tables: int = 0
    output_images: int = 0

    @property
    def folder(self) -> str:
        return f"{PYTHON_SCRIPT_NODE.node_name} (#{self.node_id})"

    @property
    def input_port_count(self) -> int:
        """Data input ports, without the flow variable port 0."""
        return self.input_tables

    @property
    def output_port_count(self) -> int:
        """Data output ports, without the flow variable port 0."""
        return self.output_tables + self.output_images

    def output_port_kind(self, port: int) -> str:
        """'table' or 'image' for a 1-based data output port."""
        if not 1 <= port <= self.output_port_count:
            raise ValueError(f"node {self.node_id} has no output port {port}")
        return "table" if port <= self.output_tables else "image"


@dataclass(frozen=True)
class Connection:
    """A connection between data ports (1-based; port 0 is the flow variable port)."""

    source_id: int
    source_port: int
    dest_id: int
    dest_port: int


@dataclass(frozen=True)
class WorkflowVariable:
    """A workflow variable: STRING, INTEGER or DOUBLE."""

    name: str
    value: str | int | float

    @property
    def kind(self) -> str:
        if isinstance(self.value, bool):
            raise TypeError(f"workflow variable {self.name!r}: booleans are not supported")
        if isinstance(self.value, int):
            return "INTEGER"
        if isinstance(self.value, float):
            return "DOUBLE"
        return "STRING"


@dataclass(frozen=True)
class Link:
    url: str
    text: str


@dataclass
class Workflow:
    """Everything needed to write one workflow folder."""

    name: str
    title: str
    description: str
    tags: list[str]
    links: list[Link]
    author: str
    nodes: list[PythonScriptNode]
    connections: list[Connection]
    annotations: list[Annotation] = field(default_factory=list)
    variables: list[WorkflowVariable] = field(default_factory=list)
    data_files: dict[str, bytes] = field(default_factory=dict)

    def check(self) -> None:
        """Raise ValueError when ids, ports or connections are inconsistent."""
        ids = [node.node_id for node in self.nodes]
        if len(set(ids)) != len(ids):
            raise ValueError(f"workflow {self.name}: duplicate node ids {ids}")
        by_id = {node.node_id: node for node in self.nodes}
        used_inputs: set[tuple[int, int]] = set()
        for connection in self.connections:
            source = by_id.get(connection.source_id)
            dest = by_id.get(connection.dest_id)
            if source is None or dest is None:
                raise ValueError(f"workflow {self.name}: connection {connection} to unknown node")
            if source.output_port_kind(connection.source_port) != "table":
                raise ValueError(f"workflow {self.name}: {connection} starts at an image port")
            if not 1 <= connection.dest_port <= dest.input_port_count:
                raise ValueError(f"workflow {self.name}: {connection} ends at a missing port")
            target = (connection.dest_id, connection.dest_port)
            if target in used_inputs:
                raise ValueError(f"workflow {self.name}: two connections into {target}")
            used_inputs.add(target)
        for node in self.nodes:
            for port in range(1, node.input_port_count + 1):
                if (node.node_id, port) not in used_inputs:
                    raise ValueError(
                        f"workflow {self.name}: input {port} of node {node.node_id} open"
                    )


# -- node settings.xml ----------------------------------------------------------------------------


def _add_annotation_data(config: Config, annotation: Annotation) -> None:
    config.add_string("text", annotation.text)
    config.add_string("contentType", "text/plain")
    config.add_int("bgcolor", annotation.background)
    config.add_int("x-coordinate", annotation.x)
    config.add_int("y-coordinate", annotation.y)
    config.add_int("width", annotation.width)
    config.add_int("height", annotation.height)
    config.add_string("alignment", annotation.alignment)
    config.add_int("borderSize", annotation.border_size)
    config.add_int("borderColor", annotation.border_color)
    config.add_int("defFontSize", annotation.font_size)
    config.add_int("annotation-version", 20230412)
    config.add_config("styles")


def _add_port_group(config: Config, group: str, count: int, object_class: str) -> None:
    group_config = config.add_config(group)
    for index in range(count):
        group_config.add_config(f"port_{index}").add_string("object_class", object_class)


def node_settings(node: PythonScriptNode) -> Config:
    """The settings.xml tree of a never-executed Python Script node."""
    node_type = PYTHON_SCRIPT_NODE
    root = Config("settings.xml")
    root.add_string("node_file", "settings.xml")
    root.add_config("flow_stack")
    root.add_config("internal_node_subsettings").add_string("memory_policy", "CacheSmallInMemory")
    model = root.add_config("model")
    model.add_string("script", node.script)
    model.add_string("python3_command", "")  # "" = the Python environment from the preferences
    _add_annotation_data(
        root.add_config("nodeAnnotation"),
        Annotation(text=node.label, alignment="CENTER", font_size=-1),
    )
    root.add_string("customDescription", None)
    root.add_string("state", "IDLE")
    root.add_string("factory", node_type.factory)
    root.add_string("node-name", node_type.node_name)
    root.add_string("node-bundle-name", node_type.bundle_name)
    root.add_string("node-bundle-symbolic-name", node_type.bundle_symbolic_name)
    root.add_string("node-bundle-vendor", node_type.bundle_vendor)
    root.add_string("node-bundle-version", node_type.bundle_version)
    root.add_string("node-feature-name", node_type.feature_name)
    root.add_string("node-feature-symbolic-name", node_type.feature_symbolic_name)
    root.add_string("node-feature-vendor", node_type.feature_vendor)
    root.add_string("node-feature-version", node_type.feature_version)
    root.add_config("factory_settings")
    creation = root.add_config("node_creation_config")
    _add_port_group(creation, "Input object (pickled)", 0, PICKLED_OBJECT)
    _add_port_group(creation, "Input table", node.input_tables, BUFFERED_DATA_TABLE)
    _add_port_group(creation, "Output table", node.output_tables, BUFFERED_DATA_TABLE)
    _add_port_group(creation, "Output image", node.output_images, IMAGE_PORT_OBJECT)
    _add_port_group(creation, "Output object (pickled)", 0, PICKLED_OBJECT)
    root.add_string("name", node_type.node_name)
    root.add_bool("hasContent", False)
    root.add_bool("isInactive", False)
    ports = root.add_config("ports")
    for port in range(1, node.output_port_count + 1):
        port_config = ports.add_config(f"port_{port}")
        port_config.add_int("index", port)
        port_config.add_string("port_dir_location", None)
    filestores = root.add_config("filestores")
    filestores.add_string("file_store_location", None)
    filestores.add_string("file_store_id", None)
    return root


# -- workflow.knime -------------------------------------------------------------------------------


def workflow_knime(workflow: Workflow) -> Config:
    """The workflow.knime tree."""
    workflow.check()
    root = Config("workflow.knime")
    root.add_string("created_by", CREATED_BY)
    root.add_bool("created_by_nightly", False)
    root.add_string("version", WORKFLOW_FORMAT_VERSION)
    root.add_string("name", None)
    author = root.add_config("authorInformation")
    author.add_string("authored-by", workflow.author)
    author.add_string("authored-when", FIXED_TIMESTAMP)
    author.add_string("lastEdited-by", None)
    author.add_string("lastEdited-when", None)
    root.add_string("customDescription", None)
    root.add_string("state", "IDLE")
    if workflow.variables:
        variables = root.add_config("workflow_variables")
        for index, variable in enumerate(workflow.variables):
            var_config = variables.add_config(f"Var_{index}")
            var_config.add_string("name", variable.name)
            var_config.add_string("class", variable.kind)
            if isinstance(variable.value, int):
                var_config.add_int("value", variable.value)
            elif isinstance(variable.value, float):
                var_config.add_double("value", variable.value)
            else:
                var_config.add_string("value", variable.value)
    root.add_config("workflow_credentials")
    if workflow.annotations:
        annotations = root.add_config("annotations")
        for index, annotation in enumerate(workflow.annotations):
            _add_annotation_data(annotations.add_config(f"annotation_{index}"), annotation)
    nodes = root.add_config("nodes")
    for node in workflow.nodes:
        node_config = nodes.add_config(f"node_{node.node_id}")
        node_config.add_int("id", node.node_id)
        node_config.add_string("node_settings_file", f"{node.folder}/settings.xml")
        node_config.add_bool("node_is_meta", False)
        node_config.add_string("node_type", "NativeNode")
        node_config.add_string("ui_classname", NODE_UI_CLASS)
        ui = node_config.add_config("ui_settings")
        ui.add_int_array("extrainfo.node.bounds", [node.x, node.y, NODE_WIDTH, NODE_HEIGHT])
    connections = root.add_config("connections")
    for index, connection in enumerate(workflow.connections):
        conn = connections.add_config(f"connection_{index}")
        conn.add_int("sourceID", connection.source_id)
        conn.add_int("destID", connection.dest_id)
        conn.add_int("sourcePort", connection.source_port)
        conn.add_int("destPort", connection.dest_port)
        conn.add_string("ui_classname", CONNECTION_UI_CLASS)
        conn.add_config("ui_settings").add_int("extrainfo.conn.bendpoints_size", 0)
    editor = root.add_config("workflow_editor_settings")
    editor.add_bool("workflow.editor.snapToGrid", False)
    editor.add_bool("workflow.editor.ShowGrid", False)
    editor.add_int("workflow.editor.gridX", 20)
    editor.add_int("workflow.editor.gridY", 20)
    editor.add_double("workflow.editor.zoomLevel", 1.0)
    editor.add_bool("workflow.editor.curvedConnections", False)
    editor.add_int("workflow.editor.connectionWidth", 1)
    return root


# -- metadata -------------------------------------------------------------------------------------

METADATA_NAMESPACE = "http://www.knime.org/core/node/workflow/metadata/v1.0"
METAINFO_NAMESPACE = "http://www.knime.org/2.9/metainfo"


def workflow_metadata_xml(workflow: Workflow) -> bytes:
    """workflow-metadata.xml: author, dates, description, tags and links (KNIME 5.1+)."""
    lines = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<workflow-metadata xmlns={quoteattr(METADATA_NAMESPACE)} content-type="text/plain">',
        f"    <author>{xml_text(workflow.author)}</author>",
        f"    <created>{FIXED_ISO_TIMESTAMP}</created>",
        f"    <last-modified>{FIXED_ISO_TIMESTAMP}</last-modified>",
        f"    <description>{xml_text(workflow.description)}</description>",
        "    <tags>",
        *(f"        <tag>{xml_text(tag)}</tag>" for tag in workflow.tags),
        "    </tags>",
        "    <links>",
        *(
            f"        <link href={quoteattr(link.url)}>{xml_text(link.text)}</link>"
            for link in workflow.links
        ),
        "    </links>",
        "</workflow-metadata>",
    ]
    return ("\n".join(lines) + "\n").encode("utf-8")


def workflowset_meta_xml(workflow: Workflow) -> bytes:
    """The legacy workflowset.meta that KNIME 5.x still writes next to workflow-metadata.xml."""
    comments = [workflow.title, "", workflow.description, ""]
    comments += [f"URL: {link.text} {link.url}" for link in workflow.links]
    comments += ["", f"TAGS: {','.join(workflow.tags)}"]
    elements = [
        ("text", "Author", workflow.author),
        ("date", "Creation Date", "1/0/2024/00:00:00 +00:00"),
        ("multiline", "Comments", "\n".join(comments)),
    ]
    lines = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<KNIMEMetaInfo xmlns={quoteattr(METAINFO_NAMESPACE)} nrOfElements="{len(elements)}">',
        "    <!--",
        "    This file is auto-generated and is overwritten each time the workflow is saved.",
        "    The metadata have moved to the `workflow-metadata.xml` file.",
        "-->",
    ]
    for form, name, value in elements:
        attributes = f'form="{form}" name="{name}" read-only="false"'
        lines.append(f"    <element {attributes}>{xml_text(value)}</element>")
    lines.append("</KNIMEMetaInfo>")
    return ("\n".join(lines) + "\n").encode("utf-8")


# -- writing --------------------------------------------------------------------------------------


def workflow_files(workflow: Workflow) -> dict[str, bytes]:
    """All files of the workflow folder, keyed by their relative POSIX path."""
    files: dict[str, bytes] = {
        "workflow.knime": to_xml(workflow_knime(workflow)),
        "workflow-metadata.xml": workflow_metadata_xml(workflow),
        "workflowset.meta": workflowset_meta_xml(workflow),
    }
    for node in workflow.nodes:
        files[f"{node.folder}/settings.xml"] = to_xml(node_settings(node))
    for relative, content in workflow.data_files.items():
        files[f"data/{relative}"] = content
    return dict(sorted(files.items()))


def write_folder(files: Mapping[str, bytes], folder: Path) -> None:
    """Write the files into a new folder (the caller removes an old one first)."""
    folder.mkdir(parents=True, exist_ok=False)
    for relative, content in files.items():
        target = folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)


def remove_folder(folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)


def zip_bytes(files: Mapping[str, bytes], top_folder: str = "") -> bytes:
    """A reproducible zip: sorted entries, fixed timestamps and permissions, optional top folder."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zipped:
        for relative in sorted(files):
            name = f"{top_folder}/{relative}" if top_folder else relative
            info = zipfile.ZipInfo(name, date_time=ZIP_TIMESTAMP)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3  # unix, so that the permission bits below are meaningful
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            zipped.writestr(info, files[relative], compresslevel=6)
    return buffer.getvalue()


def write_knwf(files: Mapping[str, bytes], top_folder: str, archive: Path) -> None:
    """A .knwf archive: a zip holding exactly one top folder, byte-for-byte reproducible."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    temporary = archive.with_name(archive.name + ".partial")
    temporary.write_bytes(zip_bytes(files, top_folder))
    temporary.replace(archive)


def zip_folder_bytes(folder: Path) -> bytes:
    """Zip a folder's files (relative paths at the top level), reproducibly."""
    return zip_bytes(read_files(folder))


def read_files(folder: Path, skip: Iterable[str] = ()) -> dict[str, bytes]:
    """All files under a folder by relative POSIX path, without paths having a part in ``skip``."""
    skipped = set(skip)
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not skipped.intersection(path.relative_to(folder).parts)
    }
