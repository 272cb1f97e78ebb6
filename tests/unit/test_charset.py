"""A request body read in the charset its Content-Type names (service.api.charset)."""

from __future__ import annotations

import codecs

import pytest

from service.api.charset import as_utf8, declared_charset
from service.errors import InvalidSpec, UnsupportedMediaType

TEXT = "name: café\n"


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/yaml", TEXT.encode()),
        ("application/yaml; charset=utf-8", TEXT.encode()),
        ('application/yaml; charset="ISO-8859-1"', TEXT.encode("latin-1")),
        ("Application/YAML;CHARSET=cp1252", TEXT.encode("cp1252")),
        ("application/yaml; charset=utf-16", TEXT.encode("utf-16")),  # with its BOM
        # RFC 2781 4.3: without a BOM, UTF-16 is big-endian (Python's codec: little).
        ("application/yaml; charset=utf-16", TEXT.encode("utf-16-be")),
        ("application/yaml; charset=utf-32", TEXT.encode("utf-32-be")),
        ("application/yaml; charset=utf-32", codecs.BOM_UTF32_LE + TEXT.encode("utf-32-le")),
        ('application/yaml; charset="utf-8"; charset=utf-8', TEXT.encode()),  # the same one
    ],
)
def test_a_body_is_read_in_its_charset(content_type: str, body: bytes) -> None:
    assert as_utf8(body, content_type).decode() == TEXT


def test_a_multibyte_charset() -> None:
    text = "name: 日本語\n"
    assert as_utf8(text.encode("shift_jis"), "application/json; charset=Shift_JIS") == (
        text.encode()
    )


@pytest.mark.parametrize(
    "charset",
    [
        "klingon",
        "",
        "é",
        "a\x00b",
        "utf-8''%C3%A9",
        # Bytes to bytes, or text to text: not a text encoding.
        "base64",
        "zlib",
        "hex",
        "rot13",
        # Not document charsets: punycode's (and idna's) decoder is quadratic in the body.
        "punycode",
        "idna",
        "unicode_escape",
        "raw_unicode_escape",
        "undefined",
    ],
)
def test_a_charset_that_is_not_a_text_encoding_is_415(charset: str) -> None:
    with pytest.raises(UnsupportedMediaType, match="is not a known text encoding"):
        as_utf8(b"name: x\n", f"application/yaml; charset={charset}")


def test_two_charsets_are_415_and_a_long_header_is_read() -> None:
    with pytest.raises(UnsupportedMediaType, match="names 2 charsets"):
        as_utf8(b"x", "application/yaml; charset=utf-16; charset=utf-8")
    # email.message took ~10 s of the event loop on this header (quadratic in a quoted
    # value full of ";"); the split is linear.
    header = 'application/yaml; a="' + ";" * 100_000 + '"; charset=latin-1'
    assert declared_charset(header) == "latin-1"


@pytest.mark.parametrize(
    ("content_type", "body", "message"),
    [
        ("application/yaml; charset=cp1252", b"name: \x81\n", "not cp1252 text (byte 6)"),
        ("application/yaml; charset=us-ascii", TEXT.encode(), "not us-ascii text (byte 9)"),
        ("application/yaml; charset=utf-16", b"\xff\xfe\x00\xd8", "not utf-16 text (byte 2)"),
        (
            "application/yaml; charset=utf-7",
            b"name: a+2AA-b",  # valid UTF-7 for a lone surrogate
            "not valid Unicode text (a lone surrogate at character 7)",
        ),
    ],
)
def test_a_body_not_in_its_charset_is_422_naming_the_body(
    content_type: str, body: bytes, message: str
) -> None:
    with pytest.raises(InvalidSpec) as info:
        as_utf8(body, content_type)
    assert [(e.loc, e.msg.split(",")[0]) for e in info.value.errors] == [("body", message)]
