"""The offline sample corpus: deterministic, sized, real prose, no side effects."""

import json
import subprocess
import sys

import pytest

from megatron_ntp.data.sample_corpus import iter_documents, parse_size, write_sample_corpus


def test_deterministic_and_sized(tmp_path):
    first = write_sample_corpus(str(tmp_path / "a.jsonl"), max_bytes=200_000)
    second = write_sample_corpus(str(tmp_path / "b.jsonl"), max_bytes=200_000)
    data = (tmp_path / "a.jsonl").read_bytes()
    assert data == (tmp_path / "b.jsonl").read_bytes()
    assert (first.documents, first.bytes) == (second.documents, second.bytes)
    assert 190_000 < len(data) <= 200_000 and first.bytes == len(data)
    docs = [json.loads(line) for line in data.splitlines()]
    assert len(docs) == first.documents and first.repeats == 1
    assert all(isinstance(d["text"], str) and len(d["text"]) >= 40 for d in docs)
    assert len({d["text"] for d in docs}) == len(docs)  # no duplicate texts
    # English prose: mostly letters and spaces, with common English words.
    text = " ".join(d["text"] for d in docs)
    assert sum(c.isalpha() or c.isspace() for c in text) / len(text) > 0.85
    assert text.count(" the ") > 1000


def test_max_docs_and_prefix_property(tmp_path):
    write_sample_corpus(str(tmp_path / "ten.jsonl"), max_docs=10)
    write_sample_corpus(str(tmp_path / "big.jsonl"), max_bytes=50_000)
    ten = (tmp_path / "ten.jsonl").read_bytes().splitlines()
    assert len(ten) == 10
    assert (tmp_path / "big.jsonl").read_bytes().splitlines()[:10] == ten  # same order


def _fake_library(root):
    """A tiny standard-library-like tree: two real modules, and files that must be skipped."""

    def docstring(what):
        return '"""A docstring long enough to count as prose for the corpus: %s."""' % what

    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "__init__.py").write_text(docstring("package") + "\n")
    (root / "pkg" / "mod.py").write_text("\n".join([
        docstring("module"),
        "if True:",
        "    class C:",
        "        " + docstring("class"),
        "        def f(self):",
        "            " + docstring("method"),
        "def g():",
        "    " + docstring("module"),  # a duplicate text: kept once
    ]) + "\n")
    for skipped in ("test", "idlelib", "site-packages"):
        (root / skipped).mkdir()
        (root / skipped / "x.py").write_text(docstring(skipped) + "\n")
    (root / "antigravity.py").write_text(docstring("antigravity") + "\n")
    (root / "broken.py").write_text("def (:\n")  # unparsable files are skipped


def test_walk_order_nesting_and_skips(tmp_path):
    _fake_library(tmp_path)
    sources = [d["source"] for d in iter_documents(str(tmp_path))]
    assert sources == ["pkg", "pkg.mod", "pkg.mod:C", "pkg.mod:C.f"]


def test_repeats_beyond_the_unique_text(tmp_path):
    _fake_library(tmp_path / "lib")
    stats = write_sample_corpus(str(tmp_path / "c.jsonl"), max_docs=10, root=str(tmp_path / "lib"))
    lines = (tmp_path / "c.jsonl").read_bytes().splitlines()
    assert (stats.documents, stats.unique_documents, stats.repeats) == (10, 4, 3)
    assert lines == lines[:4] * 2 + lines[:2]


def test_sources_skip_tests_guis_and_are_not_imported():
    before = set(sys.modules)
    sources = [d["source"] for d in iter_documents()]
    imported = set(sys.modules) - before
    assert not {"antigravity", "this", "idlelib", "tkinter", "turtledemo"} & imported
    top_level = {s.split(":")[0].split(".")[0] for s in sources}
    assert not top_level & {"idlelib", "tkinter", "turtledemo", "antigravity", "this", "test"}
    assert not any(".test." in s or ".tests." in s for s in sources)
    assert any(s.startswith("json.decoder:JSONDecoder") for s in sources)
    assert any(s.startswith("pydoc_data.topics:") for s in sources)  # the language reference


def test_parse_size():
    assert parse_size("4MB") == 4_000_000
    assert parse_size("512KiB") == 524_288
    assert parse_size("2m") == 2_000_000
    assert parse_size("1000") == 1000
    with pytest.raises(ValueError, match="'lots'"):
        parse_size("lots")
    with pytest.raises(ValueError, match="max_bytes or max_docs"):
        write_sample_corpus("x.jsonl")


def test_cli(tmp_path):
    out = tmp_path / "corpus.jsonl"
    run = subprocess.run([sys.executable, "-m", "megatron_ntp.data.sample_corpus", "--out",
                          str(out), "--size", "100KB"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "wrote" in run.stderr and 90_000 < out.stat().st_size <= 100_000
    run = subprocess.run([sys.executable, "-m", "megatron_ntp.data.sample_corpus", "--out",
                          str(tmp_path / "missing" / "c.jsonl"), "--docs", "3"],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "does not exist" in run.stderr
