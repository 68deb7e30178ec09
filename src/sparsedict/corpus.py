"""The embedded default corpus: the CPython 3.11 and PostgreSQL 15 manuals from Debian, prose only.

``apt-get install -y --no-install-recommends python3-doc postgresql-doc-15`` installs the reST sources
of the Python manual (``/usr/share/doc/python3.11/html/_sources/**/*.rst.txt``) and the PostgreSQL
manual as HTML (``/usr/share/doc/postgresql-doc-15/html/*.html``). :func:`build_corpus` keeps the
prose (paragraphs, list items, headings) and drops code and literal blocks, directives that hold
code or tables, tables, ``<pre>`` and synopses, then writes one JSONL record per document,
``{"text": ..., "source": ...}``, under ``cache_dir()/corpus/{train,test}.jsonl``. The held-out split
is fixed by a stable hash of each document's path (5 % -> ``test``). :func:`load_corpus` reads the
files back through ``datasets.load_dataset("json", ...)``.

Licences: the Python documentation is under the PSF licence (Python Software Foundation License
Version 2), the PostgreSQL documentation under the PostgreSQL licence (BSD-style).

``sparsedict/data/corpus_sample.jsonl`` (package data) is a small sample of the same prose, so tests and
``dataset: embedded-sample`` need no build.
"""

from __future__ import annotations

import hashlib
import html
import json
import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

from sparsedict.data import CORPUS_SAMPLE

PYTHON_DOCS = Path("/usr/share/doc/python3.11/html/_sources")
POSTGRES_DOCS = Path("/usr/share/doc/postgresql-doc-15/html")
APT_COMMAND = "sudo apt-get install -y --no-install-recommends python3-doc postgresql-doc-15"
LICENCE_NOTE = (
    "Python 3.11 documentation: PSF License Version 2 (Python Software Foundation); "
    "PostgreSQL 15 documentation: PostgreSQL License (BSD-style), (c) The PostgreSQL Global Development Group."
)
TEST_FRACTION = 0.05
"""Fraction of documents held out as the ``test`` split (by stable hash of the source path)."""
MIN_CHARS = 200
"""Documents with less prose than this are dropped (index pages, stubs)."""

# reST directives whose body is code, tables or machinery rather than prose.
_DROP_DIRECTIVES = {
    "code-block", "code", "sourcecode", "literalinclude", "productionlist", "table", "csv-table",
    "list-table", "index", "toctree", "image", "figure", "highlight", "testcode", "testoutput",
    "testsetup", "testcleanup", "doctest", "raw", "only", "include", "sectionauthor", "moduleauthor",
    "module", "currentmodule", "tabularcolumns", "audit-event", "availability", "impl-detail",
    "opcode", "pdbcommand", "cmdoption", "option", "program", "literal",
}  # fmt: skip
_ROLE = re.compile(r":[\w:+-]+:`(~|!)?([^`<]*?)(?:\s*<[^>`]*>)?`")
_LINK = re.compile(r"`([^`<]+?)\s*<[^>`]*>`_{1,2}")
_LITERAL = re.compile(r"``([^`]+)``")
_SIMPLE = re.compile(r"`([^`]+)`_{0,2}")
_EMPH = re.compile(r"(?<![\w*])\*{1,2}([^*\s][^*]*?)\*{1,2}(?![\w*])")
_SUBST = re.compile(r"\|([\w-]+)\|_?")
_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+<>:._])\1{2,}\s*$")
_TABLE = re.compile(r"^\s*(\+[-=+]+\+|=+(\s+=+)+)\s*$")


def split_of(source: str) -> str:
    """``"test"`` for ~5 % of documents chosen by a stable hash of ``source``, else ``"train"``."""
    digest = hashlib.sha256(source.encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < TEST_FRACTION else "train"


def _inline(text: str) -> str:
    text = _ROLE.sub(lambda m: m.group(2).strip(), text)
    text = _LINK.sub(r"\1", text)
    text = _LITERAL.sub(r"\1", text)
    text = _SIMPLE.sub(r"\1", text)
    text = _EMPH.sub(r"\1", text)
    text = _SUBST.sub(r"\1", text)
    return re.sub(r"\s+", " ", text.replace("\\", "")).strip()


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def rst_prose(source: str) -> str:
    """Prose paragraphs of a reST document (one paragraph per line, separated by blank lines)."""
    lines = source.expandtabs(4).splitlines()
    paragraphs: list[str] = []
    current: list[str] = []
    skip_indent: int | None = None  # drop lines indented deeper than this (literal/directive bodies)
    literal_next = False
    last_indent = 0

    def flush() -> None:
        if current:
            para = _inline(" ".join(current))
            if para.endswith("::"):
                para = para[:-1]
            if len(para.split()) >= 3 and not para.startswith(">>>"):
                paragraphs.append(para)
            current.clear()

    for line in lines:
        stripped = line.strip()
        ind = _indent(line)
        if skip_indent is not None:
            if not stripped or ind > skip_indent:
                continue
            skip_indent = None
        if not stripped:
            flush()
            if literal_next:
                skip_indent, literal_next = last_indent, False
            continue
        if _UNDERLINE.match(stripped) or _TABLE.match(line) or stripped.startswith((">>>", "...", "|")):
            flush()
            continue
        if stripped.startswith(".. ") or stripped == "..":
            flush()
            match = re.match(r"\.\. ([\w:-]+)::", stripped)
            name = match.group(1).split(":")[-1] if match else None
            if match is None or name in _DROP_DIRECTIVES:
                skip_indent = ind  # comments, targets, footnotes and code-like directives
            continue
        if stripped.startswith(":") and re.match(r":[\w -]+:( |$)", stripped):
            flush()  # field lists / directive options
            continue
        if re.match(r"^([-*+•]|\d+\.|#\.)\s", stripped):
            flush()
            stripped = re.sub(r"^([-*+•]|\d+\.|#\.)\s+", "", stripped)
        current.append(stripped)
        last_indent = ind
        if stripped.endswith("::"):
            literal_next = True
    flush()
    return "\n\n".join(paragraphs)


class _ProseHTML(HTMLParser):
    """Collect text inside ``<p>`` and headings, skipping tables, ``<pre>``, synopses and navigation."""

    _SKIP = frozenset({"pre", "table", "script", "style", "head"})
    _SKIP_CLASSES = frozenset(
        {"navheader", "navfooter", "toc", "refsynopsisdiv", "synopsis", "cmdsynopsis", "funcsynopsis"}
    )

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._stack: list[tuple[str, bool]] = []  # (tag, skipping)
        self._buf: list[str] | None = None
        self._depth_p = 0

    def _skipping(self) -> bool:
        return any(skip for _, skip in self._stack)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("br", "img", "hr", "meta", "link", "col", "input"):
            return
        classes = set((dict(attrs).get("class") or "").split())
        self._stack.append((tag, tag in self._SKIP or bool(classes & self._SKIP_CLASSES)))
        if tag in ("p", "h1", "h2", "h3", "h4") and not self._skipping() and self._buf is None:
            self._buf, self._depth_p = [], len(self._stack)

    def handle_endtag(self, tag: str) -> None:
        while self._stack:
            open_tag, _ = self._stack.pop()
            if self._buf is not None and len(self._stack) < self._depth_p:
                text = re.sub(r"\s+", " ", "".join(self._buf)).strip()
                if len(text.split()) >= 3:
                    self.paragraphs.append(text)
                self._buf = None
            if open_tag == tag:
                break

    def handle_data(self, data: str) -> None:
        if self._buf is not None and not self._skipping():
            self._buf.append(data)


def html_prose(source: str) -> str:
    """Prose paragraphs of a DocBook HTML page (one per line, separated by blank lines)."""
    parser = _ProseHTML()
    parser.feed(source)
    parser.close()
    return "\n\n".join(html.unescape(p) for p in parser.paragraphs)


def iter_documents() -> Iterator[dict[str, str]]:
    """Yield ``{"text", "source"}`` for every Debian manual page with enough prose (sorted by path)."""
    missing = [str(p) for p in (PYTHON_DOCS, POSTGRES_DOCS) if not p.is_dir()]
    if missing:
        raise FileNotFoundError(
            f"The embedded corpus needs the Debian documentation packages ({', '.join(missing)} not found). "
            f"Install them with `{APT_COMMAND}`, or pass `--dataset` with any `datasets` dataset or a "
            "local json/jsonl/txt/parquet file instead."
        )
    for path in sorted(PYTHON_DOCS.rglob("*.rst.txt")):
        text = rst_prose(path.read_text(errors="replace"))
        if len(text) >= MIN_CHARS:
            yield {"text": text, "source": f"python3.11/{path.relative_to(PYTHON_DOCS)}"}
    for path in sorted(POSTGRES_DOCS.glob("*.html")):
        text = html_prose(path.read_text(errors="replace"))
        if len(text) >= MIN_CHARS:
            yield {"text": text, "source": f"postgresql-15/{path.name}"}


def corpus_dir() -> Path:
    from sparsedict.lm import cache_dir

    return cache_dir() / "corpus"


def build_corpus(out: Path | None = None) -> dict[str, int]:
    """Write ``train.jsonl`` / ``test.jsonl`` (atomically) and return document/character counts."""
    out = Path(out) if out is not None else corpus_dir()
    out.mkdir(parents=True, exist_ok=True)
    counts = {"train": 0, "test": 0, "chars": 0}
    tmp = {s: out / f"{s}.jsonl.tmp" for s in ("train", "test")}
    handles = {s: tmp[s].open("w") for s in tmp}
    try:
        for doc in iter_documents():
            split = split_of(doc["source"])
            handles[split].write(json.dumps(doc, ensure_ascii=False) + "\n")
            counts[split] += 1
            counts["chars"] += len(doc["text"])
    finally:
        for h in handles.values():
            h.close()
    for s, path in tmp.items():
        path.replace(out / f"{s}.jsonl")
    (out / "LICENCE.txt").write_text(LICENCE_NOTE + "\n")
    return counts


def corpus_files(split: str = "train", sample: bool = False) -> list[str]:
    """JSONL files of ``split``; builds the corpus on first use (``sample=True``: the shipped sample)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if sample:
        if not CORPUS_SAMPLE.exists():
            raise FileNotFoundError(f"{CORPUS_SAMPLE} is missing: reinstall sparsedict (it is package data)")
        return [str(CORPUS_SAMPLE)]
    path = corpus_dir() / f"{split}.jsonl"
    if not path.exists():
        build_corpus()
    return [str(path)]


def load_corpus(split: str = "train", sample: bool = False):
    """The embedded corpus as a ``datasets.Dataset`` with columns ``text`` and ``source``.

    ``sample=True`` reads the small prose sample shipped as package data (its documents are
    filtered by the same hash split, so ``train``/``test`` stay disjoint there too).
    """
    import datasets

    ds = datasets.load_dataset("json", data_files=corpus_files(split, sample), split="train")
    if sample:
        ds = ds.filter(lambda row: split_of(row["source"]) == split)
    return ds
