"""Embedded corpus: prose extraction from reST/HTML, stable held-out split, the hash-interleaved document
order and its marker, the shipped sample, the full build."""

from __future__ import annotations

import hashlib
import json

import pytest
from helpers import debian_docs

from sparsedict import corpus

RST = """\
.. _tut-x:

*************
Control Flow
*************

Besides the :keyword:`while` statement, Python uses ``for`` loops and the
:func:`range <builtins.range>` function.  For example::

   >>> for i in range(3):
   ...     print(i)

.. code-block:: python

   secret_code = 1

.. note::

   Notes are prose and are kept in the corpus.

+-------+-------+
| table | cells |
+-------+-------+

* A bullet item that is kept as prose.
"""

HTML = """<html><head><title>t</title></head><body>
<div class="navheader"><p>Prev Up Next navigation</p></div>
<div class="refsynopsisdiv"><p>SELECT synopsis_should_go [ ALL ]</p></div>
<p>SELECT retrieves rows from <code class="literal">zero</code> or more tables.</p>
<pre class="programlisting">SELECT * FROM secret_table;</pre>
<table><tr><td><p>cell text dropped here</p></td></tr></table>
<ul><li><p>A list item in a paragraph is kept.</p></li></ul>
</body></html>"""


def test_rst_prose_keeps_paragraphs_drops_code():
    text = corpus.rst_prose(RST)
    assert "Besides the while statement, Python uses for loops and the range function. For example:" in text
    assert "Notes are prose and are kept in the corpus." in text
    assert "A bullet item that is kept as prose." in text
    for dropped in ("print(i)", "secret_code", "table | cells", "tut-x", "*****", ">>>"):
        assert dropped not in text


def test_html_prose_keeps_paragraphs_drops_pre_tables_synopses():
    text = corpus.html_prose(HTML)
    assert text.split("\n\n") == [
        "SELECT retrieves rows from zero or more tables.",
        "A list item in a paragraph is kept.",
    ]


def test_split_is_stable_and_about_five_percent():
    names = [f"python3.11/library/mod{i}.rst.txt" for i in range(4000)]
    splits = [corpus.split_of(n) for n in names]
    assert splits == [corpus.split_of(n) for n in names]
    assert 0.04 < splits.count("test") / len(splits) < 0.06


def _sources(path):
    return [json.loads(line)["source"] for line in path.open()]


def test_order_is_a_stable_hash_interleave_not_path_order(tmp_path, monkeypatch):
    docs = debian_docs(tmp_path / "docs-a", monkeypatch)
    counts = corpus.build_corpus(tmp_path / "a")
    debian_docs(tmp_path / "docs-b", monkeypatch, files_in_reverse=True)
    corpus.build_corpus(tmp_path / "b")
    for name in ("train.jsonl", "test.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    train, test = _sources(tmp_path / "a" / "train.jsonl"), _sources(tmp_path / "a" / "test.jsonl")
    # split membership is still split_of's; the order within each split is sha256("order:" + source)
    assert sorted(train + test) == sorted(d["source"] for d in docs)
    assert {corpus.split_of(s) for s in train} == {"train"} and {corpus.split_of(s) for s in test} == {"test"}
    for sources in (train, test):
        assert sources == sorted(sources, key=lambda s: hashlib.sha256(b"order:" + s.encode()).digest())
    assert train != sorted(train)
    assert {s.split("/")[0] for s in train[: len(train) // 4]} == {"python3.11", "postgresql-15"}
    marker = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert marker == {"order": corpus.ORDER, **counts} and counts["train"] == len(train)


def test_corpus_files_rebuilds_a_corpus_without_the_current_order(tmp_path, monkeypatch, capsys):
    debian_docs(tmp_path / "docs", monkeypatch)
    out = tmp_path / "corpus"
    monkeypatch.setattr(corpus, "corpus_dir", lambda: out)
    stale = json.dumps({"text": "stale text", "source": "python3.11/stale.rst.txt"}) + "\n"

    def plant(marker):
        out.mkdir(exist_ok=True)
        for split in ("train", "test"):
            (out / f"{split}.jsonl").write_text(stale)
        (out / "meta.json").unlink(missing_ok=True)
        if marker is not None:
            (out / "meta.json").write_text(marker)

    for marker in (None, '{"order": "by-path"}', "{"):  # no marker, another order, a truncated marker
        plant(marker)
        assert corpus.corpus_files("train") == [str(out / "train.jsonl")]
        assert "rebuilding the embedded corpus" in capsys.readouterr().err
        assert (out / "train.jsonl").read_text() != stale and (out / "test.jsonl").read_text() != stale
        assert corpus.built_order(out) == corpus.ORDER
        assert len(corpus.load_corpus("train")) == json.loads((out / "meta.json").read_text())["train"]
    plant(json.dumps({"order": corpus.ORDER}))  # the current order: used as it is
    capsys.readouterr()
    corpus.corpus_files("test")
    assert (out / "test.jsonl").read_text() == stale and not capsys.readouterr().err


def test_sample_loads_through_datasets():
    train, test = corpus.load_corpus("train", sample=True), corpus.load_corpus("test", sample=True)
    assert len(train) > 30 and len(test) >= 5 and set(train.column_names) == {"text", "source"}
    assert not set(train["source"]) & set(test["source"])
    assert all(corpus.split_of(s) == "test" for s in test["source"])
    assert sum(len(t) for t in train["text"]) > 100_000


def test_missing_debian_packages_message(monkeypatch, tmp_path):
    monkeypatch.setattr(corpus, "PYTHON_DOCS", tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"apt-get install -y --no-install-recommends python3-doc"):
        corpus.build_corpus(tmp_path / "out")


@pytest.mark.skipif(
    not corpus.PYTHON_DOCS.is_dir() or not corpus.POSTGRES_DOCS.is_dir(), reason="Debian docs absent"
)
def test_full_build(tmp_path):
    counts = corpus.build_corpus(tmp_path)
    assert 1500 < counts["train"] + counts["test"] < 1800 and counts["chars"] > 10_000_000
    assert 0.03 < counts["test"] / (counts["train"] + counts["test"]) < 0.07
    docs = [json.loads(line) for line in (tmp_path / "train.jsonl").open()]
    text = "\n".join(d["text"] for d in docs)
    paragraphs = text.split("\n")
    assert not [p for p in paragraphs if p.startswith((">>>", ".. ", "+--"))]
    assert ".. code-block::" not in text and ":func:`" not in text
    test = _sources(tmp_path / "test.jsonl")
    assert "postgresql-15/sql-select.html" in {d["source"] for d in docs} | set(test)
    # any prefix samples both manuals: both appear within the first 10 % of each split
    for sources in ([d["source"] for d in docs], test):
        assert {s.split("/")[0] for s in sources[: len(sources) // 10]} == {"python3.11", "postgresql-15"}
    assert json.loads((tmp_path / "meta.json").read_text())["order"] == corpus.ORDER
