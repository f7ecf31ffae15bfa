"""KNIME's XMLConfig format: a tree of ``config`` and ``entry`` elements.

Rules followed here (from KNIME's own writer and reader):

- the root element is ``config`` with the XMLConfig namespace and schema location and a ``key``;
- only ``config`` and ``entry`` elements exist; an entry has the attributes ``key``, ``type``,
  optionally ``isnull="true"`` (then ``value`` is ``""``), and ``value``, in this order;
- entry values are escaped before the usual XML attribute escaping: every UTF-16 code unit below
  32 or above 0xD7FF, and a ``%`` that is followed by another ``%``, is written as ``%%ddddd``
  (five decimal digits of the code unit);
- arrays are configs holding ``array-size`` and the entries ``"0"``, ``"1"``, ...
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

NAMESPACE = "http://www.knime.org/2008/09/XMLConfig"
XSI_NAMESPACE = "http://www.w3.org/2001/XMLSchema-instance"
SCHEMA_LOCATION = f"{NAMESPACE} http://www.knime.org/XMLConfig_2008_09.xsd"

ENTRY_TYPES = frozenset(
    {
        "xstring",
        "xint",
        "xlong",
        "xdouble",
        "xfloat",
        "xboolean",
        "xchar",
        "xshort",
        "xbyte",
        "xpassword",
        "xtransientstring",
    }
)

_ESCAPE_WIDTH = 5
_LAST_PLAIN_CODE_UNIT = 0xD7FF


class XMLConfigError(ValueError):
    """A document does not follow the XMLConfig rules."""


def escape(text: str) -> str:
    """Escape a value the way KNIME's XMLUtils does (on UTF-16 code units)."""
    units = _utf16_units(text)
    out: list[str] = []
    for index, unit in enumerate(units):
        next_is_percent = index + 1 < len(units) and units[index + 1] == ord("%")
        if unit < 32 or unit > _LAST_PLAIN_CODE_UNIT or (unit == ord("%") and next_is_percent):
            out.append(f"%%{unit:0{_ESCAPE_WIDTH}d}")
        else:
            out.append(chr(unit))
    return "".join(out)


def unescape(text: str) -> str:
    """Undo :func:`escape`; text without escapes is returned unchanged."""
    units: list[int] = []
    index = 0
    while index < len(text):
        candidate = text[index + 2 : index + 2 + _ESCAPE_WIDTH]
        if (
            text.startswith("%%", index)
            and len(candidate) == _ESCAPE_WIDTH
            and candidate.isascii()
            and candidate.isdigit()
        ):
            units.append(int(candidate))
            index += 2 + _ESCAPE_WIDTH
        else:
            units.extend(_utf16_units(text[index]))
            index += 1
    return _from_utf16_units(units)


def _utf16_units(text: str) -> list[int]:
    data = text.encode("utf-16-le", errors="surrogatepass")
    return [int.from_bytes(data[i : i + 2], "little") for i in range(0, len(data), 2)]


def _from_utf16_units(units: list[int]) -> str:
    data = b"".join(unit.to_bytes(2, "little") for unit in units)
    return data.decode("utf-16-le", errors="surrogatepass")


def java_double(value: float) -> str:
    """Format a float like Java's ``Double.toString`` (how KNIME writes ``xdouble``)."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    if value == 0:
        return "-0.0" if math.copysign(1.0, value) < 0 else "0.0"
    magnitude = abs(value)
    if 1e-3 <= magnitude < 1e7:
        text = repr(float(value))  # plain notation in this range, shortest round-trip digits
        return text if "." in text else f"{text}.0"
    mantissa, exponent = _shortest_scientific(value)
    return f"{mantissa}E{exponent}"


def _shortest_scientific(value: float) -> tuple[str, int]:
    text = repr(value)  # shortest round-trip representation, e.g. '1e-05' or '1.5e+20'
    if "e" in text:
        mantissa, exponent = text.split("e")
        exp = int(exponent)
    else:
        mantissa, exp = text, 0
    sign = "-" if mantissa.startswith("-") else ""
    digits = mantissa.lstrip("-").replace(".", "")
    point = mantissa.lstrip("-").find(".")
    integer_digits = point if point >= 0 else len(mantissa.lstrip("-"))
    stripped = digits.lstrip("0")
    exp += integer_digits - 1 - (len(digits) - len(stripped))
    stripped = stripped.rstrip("0") or "0"
    fraction = stripped[1:] or "0"
    return f"{sign}{stripped[0]}.{fraction}", exp


@dataclass(frozen=True)
class Entry:
    """One ``entry`` element; ``value`` None is written as ``isnull="true"``."""

    key: str
    type: str
    value: str | None


@dataclass
class Config:
    """One ``config`` element with ordered children."""

    key: str
    children: list[Entry | Config] = field(default_factory=list)

    def add_config(self, key: str) -> Config:
        """Append and return a child config."""
        child = Config(key)
        self._append(child)
        return child

    def add_string(self, key: str, value: str | None) -> Config:
        return self._entry(key, "xstring", value)

    def add_int(self, key: str, value: int) -> Config:
        return self._entry(key, "xint", str(int(value)))

    def add_long(self, key: str, value: int) -> Config:
        return self._entry(key, "xlong", str(int(value)))

    def add_double(self, key: str, value: float) -> Config:
        return self._entry(key, "xdouble", java_double(float(value)))

    def add_bool(self, key: str, value: bool) -> Config:
        return self._entry(key, "xboolean", "true" if value else "false")

    def add_int_array(self, key: str, values: Sequence[int]) -> Config:
        """Append an int array the way KNIME stores it (``array-size`` plus indexed entries)."""
        array = self.add_config(key)
        array.add_int("array-size", len(values))
        for index, value in enumerate(values):
            array.add_int(str(index), value)
        return self

    def _entry(self, key: str, entry_type: str, value: str | None) -> Config:
        self._append(Entry(key, entry_type, value))
        return self

    def _append(self, child: Entry | Config) -> None:
        if any(existing.key == child.key for existing in self.children):
            raise XMLConfigError(f"duplicate key {child.key!r} in config {self.key!r}")
        self.children.append(child)

    # -- reading -----------------------------------------------------------------------------

    def get(self, key: str) -> Entry | Config:
        """The child with this key (KeyError when absent)."""
        for child in self.children:
            if child.key == key:
                return child
        raise KeyError(f"no key {key!r} in config {self.key!r}")

    def config(self, key: str) -> Config:
        child = self.get(key)
        if not isinstance(child, Config):
            raise KeyError(f"{key!r} in config {self.key!r} is an entry, not a config")
        return child

    def value(self, key: str) -> str | None:
        child = self.get(key)
        if not isinstance(child, Entry):
            raise KeyError(f"{key!r} in config {self.key!r} is a config, not an entry")
        return child.value

    def keys(self) -> list[str]:
        return [child.key for child in self.children]

    def walk(self) -> Iterator[tuple[str, Entry | Config]]:
        """Every descendant with its slash-separated path."""
        for child in self.children:
            path = f"{self.key}/{child.key}"
            yield path, child
            if isinstance(child, Config):
                for sub_path, sub in child.walk():
                    yield f"{self.key}/{sub_path}", sub


def to_xml(root: Config) -> bytes:
    """Serialize a config tree as an XMLConfig document (UTF-8, four-space indentation)."""
    lines = ['<?xml version="1.0" encoding="UTF-8"?>']
    header = (
        f"<config xmlns={_attr(NAMESPACE)} xmlns:xsi={_attr(XSI_NAMESPACE)} "
        f"xsi:schemaLocation={_attr(SCHEMA_LOCATION)} key={_attr(root.key)}"
    )
    _write_config(root, lines, 0, header)
    return ("\n".join(lines) + "\n").encode("utf-8")


_ATTRIBUTE_ESCAPES = {
    "&": "&amp;",
    "<": "&lt;",
    ">": "&gt;",
    '"': "&quot;",
    "\n": "&#10;",
    "\r": "&#13;",
    "\t": "&#9;",
}


def _attr(text: str) -> str:
    """A double-quoted XML attribute value."""
    return '"' + "".join(_ATTRIBUTE_ESCAPES.get(char, char) for char in text) + '"'


def _write_config(config: Config, lines: list[str], depth: int, opening: str | None = None) -> None:
    indent = "    " * depth
    start = opening if opening is not None else f"<config key={_attr(config.key)}"
    if not config.children:
        lines.append(f"{indent}{start}/>")
        return
    lines.append(f"{indent}{start}>")
    for child in config.children:
        if isinstance(child, Config):
            _write_config(child, lines, depth + 1)
        else:
            null = ' isnull="true"' if child.value is None else ""
            value = escape(child.value) if child.value is not None else ""
            lines.append(
                f"{indent}    <entry key={_attr(child.key)} type={_attr(child.type)}{null} "
                f"value={_attr(value)}/>"
            )
    lines.append(f"{indent}</config>")


def from_xml(data: bytes) -> Config:
    """Parse and validate an XMLConfig document; raises XMLConfigError on any rule violation."""
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        raise XMLConfigError("XMLConfig documents must not contain DTDs or entity declarations")
    try:
        element = ET.fromstring(data)
    except ET.ParseError as error:
        raise XMLConfigError(f"not well-formed XML: {error}") from error
    if element.tag != f"{{{NAMESPACE}}}config":
        raise XMLConfigError(f"root element must be <config> in {NAMESPACE}, got {element.tag}")
    schema = element.get(f"{{{XSI_NAMESPACE}}}schemaLocation")
    if schema != SCHEMA_LOCATION:
        raise XMLConfigError(f"root xsi:schemaLocation must be {SCHEMA_LOCATION!r}, got {schema!r}")
    return _read_config(element, "")


def _read_config(element: ET.Element, parent_path: str) -> Config:
    key = element.get("key")
    if key is None:
        raise XMLConfigError(f"<config> without key under {parent_path or '/'}")
    path = f"{parent_path}/{key}"
    extra = set(element.attrib) - {"key", f"{{{XSI_NAMESPACE}}}schemaLocation"}
    if extra:
        raise XMLConfigError(f"config {path}: unexpected attributes {sorted(extra)}")
    if element.text and element.text.strip():
        raise XMLConfigError(f"config {path}: text content is not allowed")
    config = Config(key)
    for child in element:
        if child.tail and child.tail.strip():
            raise XMLConfigError(f"config {path}: text content is not allowed")
        if child.tag == f"{{{NAMESPACE}}}config":
            sub: Entry | Config = _read_config(child, path)
        elif child.tag == f"{{{NAMESPACE}}}entry":
            sub = _read_entry(child, path)
        else:
            raise XMLConfigError(
                f"config {path}: only <config> and <entry> allowed, got {child.tag}"
            )
        try:
            config._append(sub)
        except XMLConfigError as error:
            raise XMLConfigError(f"config {path}: {error}") from error
    return config


def _read_entry(element: ET.Element, parent_path: str) -> Entry:
    key = element.get("key")
    entry_type = element.get("type")
    value = element.get("value")
    where = f"entry {parent_path}/{key}"
    if key is None or entry_type is None or value is None:
        raise XMLConfigError(f"{where}: needs the attributes key, type and value")
    extra = set(element.attrib) - {"key", "type", "value", "isnull"}
    if extra:
        raise XMLConfigError(f"{where}: unexpected attributes {sorted(extra)}")
    if entry_type not in ENTRY_TYPES:
        raise XMLConfigError(f"{where}: unknown type {entry_type!r}")
    if len(element) or (element.text and element.text.strip()):
        raise XMLConfigError(f"{where}: entries have no children or text")
    isnull = element.get("isnull")
    if isnull is not None:
        if isnull != "true" or value != "":
            raise XMLConfigError(f'{where}: null entries are written as isnull="true" value=""')
        return Entry(key, entry_type, None)
    if any(ord(char) < 32 for char in value):
        raise XMLConfigError(f"{where}: control characters must be escaped as %%ddddd")
    decoded = unescape(value)
    _check_typed_value(where, entry_type, decoded)
    return Entry(key, entry_type, decoded)


def _check_typed_value(where: str, entry_type: str, value: str) -> None:
    if entry_type in {"xint", "xlong", "xshort", "xbyte"}:
        try:
            int(value)
        except ValueError:
            raise XMLConfigError(f"{where}: {value!r} is not an integer") from None
    elif entry_type in {"xdouble", "xfloat"}:
        try:
            float(value.replace("Infinity", "inf"))
        except ValueError:
            raise XMLConfigError(f"{where}: {value!r} is not a number") from None
    elif entry_type == "xboolean" and value not in {"true", "false"}:
        raise XMLConfigError(f"{where}: booleans are 'true' or 'false', got {value!r}")
    elif entry_type == "xchar" and len(value) != 1:
        raise XMLConfigError(f"{where}: a char entry holds one character, got {value!r}")
