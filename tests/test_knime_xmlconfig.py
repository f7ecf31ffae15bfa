"""KNIME XMLConfig: escaping, number formatting, serialization and validation."""

from __future__ import annotations

import random

import pytest

from twinvae.knime.xmlconfig import (
    Config,
    Entry,
    XMLConfigError,
    escape,
    from_xml,
    java_double,
    to_xml,
    unescape,
)

HEADER = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    '<config xmlns="http://www.knime.org/2008/09/XMLConfig" '
    'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
    'xsi:schemaLocation="http://www.knime.org/2008/09/XMLConfig '
    'http://www.knime.org/XMLConfig_2008_09.xsd" key="settings.xml">'
)


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [
        ("line1\nline2", "line1%%00010line2"),
        ("\ttab", "%%00009tab"),
        ("100%", "100%"),
        ("a%%b", "a%%00037%b"),
        ("%%%", "%%00037%%00037%"),
        ("grüße µm", "grüße µm"),
        ("\U0001f600", "%%55357%%56832"),  # non-BMP: both UTF-16 surrogates escaped
        ("\ufffd", "%%65533"),
    ],
)
def test_escape_matches_knime_rules(raw: str, escaped: str) -> None:
    assert escape(raw) == escaped
    assert unescape(escaped) == raw


def test_escaping_round_trips_random_text() -> None:
    rng = random.Random(5)
    alphabet = [
        "%",
        "a",
        "0",
        "9",
        "\n",
        "\r",
        "\t",
        "\x00",
        "\x1f",
        "é",
        "€",
        "\ud7ff",
        "\ue000",
        "😀",
        '"',
        "<",
        "&",
    ]
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        encoded = escape(text)
        assert all(ord(char) >= 32 for char in encoded)
        assert unescape(encoded) == text


def test_unescape_leaves_unescaped_text_alone() -> None:
    assert unescape("%%12") == "%%12"  # too short for an escape
    assert unescape("50% of %%abcde") == "50% of %%abcde"


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.0, "0.0"),
        (1.0, "1.0"),
        (0.001, "0.001"),
        (12345.678, "12345.678"),
        (1e-4, "1.0E-4"),
        (1e7, "1.0E7"),
        (-2.5e-7, "-2.5E-7"),
        (123456789.0, "1.23456789E8"),
    ],
)
def test_java_double_formatting(value: float, text: str) -> None:
    assert java_double(value) == text
    assert float(text) == value


def test_serialization_round_trip_with_nulls_arrays_and_escapes() -> None:
    root = Config("settings.xml")
    root.add_string("script", 'print("a < b & c")\n\tdone %% 100%')
    root.add_string("missing", None)
    root.add_int("count", 3)
    root.add_long("big", 2**40)
    root.add_double("ratio", 0.25)
    root.add_bool("flag", True)
    root.add_int_array("bounds", [1, 2, 3, 4])
    root.add_config("empty")
    data = to_xml(root)
    text = data.decode("utf-8")
    assert text.startswith(HEADER)
    assert '<entry key="missing" type="xstring" isnull="true" value=""/>' in text
    assert '<entry key="array-size" type="xint" value="4"/>' in text
    assert "%%00010%%00009done %%00037% 100%" in text
    assert "&quot;a &lt; b &amp; c&quot;" in text
    assert from_xml(data) == root


def test_duplicate_keys_are_refused() -> None:
    root = Config("x")
    root.add_int("a", 1)
    with pytest.raises(XMLConfigError, match="duplicate key"):
        root.add_string("a", "again")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('<other key="x"/>', "only <config> and <entry>"),
        ('<entry key="a" type="xblob" value="1"/>', "unknown type"),
        ('<entry key="a" type="xint" value="1.5"/>', "not an integer"),
        ('<entry key="a" type="xboolean" value="yes"/>', "booleans"),
        ('<entry key="a" type="xstring" isnull="true" value="x"/>', "isnull"),
        ('<entry key="a" type="xstring" value="line&#10;break"/>', "control characters"),
        ('<entry key="a" type="xstring"/>', "key, type and value"),
        (
            '<entry key="a" type="xint" value="1"/><entry key="a" type="xint" value="2"/>',
            "duplicate",
        ),
        ("<config>x</config>", "without key"),
    ],
)
def test_invalid_documents_are_rejected(body: str, message: str) -> None:
    document = f"{HEADER}{body}</config>".encode()
    with pytest.raises(XMLConfigError, match=message):
        from_xml(document)


def test_root_must_be_an_xmlconfig_document() -> None:
    with pytest.raises(XMLConfigError, match="root element"):
        from_xml(b'<config key="x"/>')
    with pytest.raises(XMLConfigError, match="DTD"):
        from_xml(b'<!DOCTYPE x [<!ENTITY a "b">]><config key="x"/>')


def test_reading_helpers() -> None:
    root = Config("r")
    root.add_config("model").add_string("script", "x")
    assert root.config("model").value("script") == "x"
    assert root.keys() == ["model"]
    assert [path for path, _ in root.walk()] == ["r/model", "r/model/script"]
    assert isinstance(root.config("model").get("script"), Entry)
    with pytest.raises(KeyError):
        root.value("model")
