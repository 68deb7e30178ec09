"""Embedded corpus: prose extraction from reST/HTML, stable held-out split, the shipped sample, the full build."""

from __future__ import annotations

import json

import pytest

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
    assert "postgresql-15/sql-select.html" in {d["source"] for d in docs} | {
        json.loads(line)["source"] for line in (tmp_path / "test.jsonl").open()
    }
