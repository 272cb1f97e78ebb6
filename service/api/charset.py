"""A request body in the ``charset`` its Content-Type names, as the UTF-8 the parsers read.

RFC 9110 8.3.2: ``charset`` is the one media-type parameter a text body's reader must
honour (``application/yaml; charset=latin-1``). JSON is UTF-8 (RFC 8259 8.1), but a
client that says otherwise is believed rather than misread.
"""

from __future__ import annotations

import codecs
from typing import Final

from service.errors import FieldError, InvalidSpec, UnsupportedMediaType

#: Codecs Python has that are not charsets of a document: their decoders are quadratic
#: in the body (punycode, and idna through it: a 1 MB body held the server for 20 s),
#: decode escapes rather than bytes, or refuse everything.
_NOT_CHARSETS: Final = frozenset(
    {"punycode", "idna", "unicode-escape", "raw-unicode-escape", "undefined"}
)
#: The byte-order marks of the codecs that read one (RFC 2781 4.3: big-endian without).
_BIG_ENDIAN_WITHOUT_BOM: Final = {
    "utf-16": ((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE), "utf-16-be"),
    "utf-32": ((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE), "utf-32-be"),
}


def declared_charset(content_type: str) -> str | None:
    """The ``charset`` parameter of a Content-Type value, unquoted, or None.

    Linear in the header (``email.message`` is quadratic in a quoted value full of
    ``;``). Raises :class:`UnsupportedMediaType` (415) for a header naming two charsets.
    """
    named = {
        value.strip().strip('"').strip()
        for name, _, value in (p.partition("=") for p in content_type.split(";")[1:])
        if name.strip().lower() in ("charset", "charset*")
    }
    if len(named) > 1:
        raise UnsupportedMediaType(f"the Content-Type names {len(named)} charsets: name one")
    return named.pop() if named else None


def as_utf8(body: bytes, content_type: str) -> bytes:
    """``body`` as UTF-8, read in the charset ``content_type`` names (as it is when none,
    or UTF-8, is named: the parsers then name a byte that is not UTF-8).

    Raises :class:`UnsupportedMediaType` (415) for a charset Python does not know as a
    text encoding; :class:`InvalidSpec` (422, loc ``body``) for a body that is not text
    in it. Linear in the body: call it off the event loop for a large one.
    """
    charset = declared_charset(content_type)
    if charset is None:
        return body
    unknown = UnsupportedMediaType(f"charset {charset[:100]!r} is not a known text encoding")
    try:
        info = codecs.lookup(charset)
    except (LookupError, ValueError):  # ValueError: a NUL in the name
        raise unknown from None
    codec = info.name
    if codec == "utf-8":
        return body
    if codec in _NOT_CHARSETS or not getattr(info, "_is_text_encoding", True):
        raise unknown  # and bytes to bytes (base64, zlib) or text to text (rot13)
    boms, big_endian = _BIG_ENDIAN_WITHOUT_BOM.get(codec, ((), codec))
    if boms and not body.startswith(boms):
        codec = big_endian
    try:
        text = body.decode(codec)
    except UnicodeDecodeError as err:
        msg = f"not {charset} text (byte {err.start}), as its Content-Type says"
        raise InvalidSpec([FieldError("body", msg)]) from None
    try:
        return text.encode()
    except UnicodeEncodeError as err:  # a lone surrogate (utf-7 and utf-16 can carry one)
        msg = f"not valid Unicode text (a lone surrogate at character {err.start})"
        raise InvalidSpec([FieldError("body", msg)]) from None
