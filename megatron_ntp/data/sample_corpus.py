"""An offline sample corpus: English text from the installed Python standard library.

Every Python install carries a few MB of real English prose: the docstrings of its standard
library and the language reference in ``pydoc_data/topics.py``. This module writes them as JSONL,
one document per module, class or function docstring (and one per reference topic), so the
quickstart and the tests have real text on any machine, with no download.

The source files are read with ``ast`` and never imported, so no module runs (``antigravity``
would open a browser, ``this`` prints, GUI modules need a display). Test suites and GUI/IDE
packages are skipped anyway: their docstrings are not prose. Files are visited in sorted order and
duplicate texts kept once, so the output is the same on every machine with the same Python
version. The unique text is about 2 MB; asking for more repeats the documents in the same order.

Usage: ``python -m megatron_ntp.data.sample_corpus --out corpus.jsonl --size 4MB``
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import sys
import sysconfig
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

# Folders never visited: installed third-party packages, test suites, GUI/IDE/demo code.
_SKIP_DIRS = frozenset({
    "site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test",
    "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip",
})
# Single modules skipped: joke/demo modules whose text is not documentation prose.
_SKIP_FILES = frozenset({"antigravity.py", "this.py", "__phello__.foo.py"})
_MIN_CHARS = 40  # shorter docstrings ("Return self.") are boilerplate, not prose
_DEFS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_BLOCKS = (ast.stmt, ast.excepthandler, ast.match_case)  # what statement bodies hold


def stdlib_dir() -> str:
    """The folder of the running interpreter's standard library (the base install, not a venv)."""
    return sysconfig.get_paths()["stdlib"]


def _source_files(root: str) -> Iterator[Tuple[str, str]]:
    """(path, dotted module name) of the library's .py files, in a fixed sorted order."""
    for dirpath, dirnames, filenames in os.walk(root):
        # Sorting in place fixes os.walk's visiting order; pruning stops it entering a folder.
        # ("config-3.11-...": the build's Makefile folder.)
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS
                             and not d.startswith((".", "config-")))
        rel = os.path.relpath(dirpath, root)
        package = "" if rel == "." else rel.replace(os.sep, ".") + "."
        for name in sorted(filenames):
            if name.endswith(".py") and name not in _SKIP_FILES:
                module = package + name[:-3]
                yield os.path.join(dirpath, name), module.removesuffix(".__init__")


def _nested_defs(body: list, prefix: str) -> Iterator[Tuple[str, ast.AST]]:
    """(qualified name, node) of classes/functions in a statement list, depth first.

    Only statements are followed (into if/try/with/for bodies too), not expressions: walking every
    node with ast.walk would double the time for nothing.
    """
    for stmt in body:
        if isinstance(stmt, _DEFS):
            name = prefix + stmt.name
            yield name, stmt
            yield from _nested_defs(stmt.body, name + ".")
            continue
        for attr in ("body", "orelse", "finalbody", "handlers", "cases"):
            sub = getattr(stmt, attr, None)
            if isinstance(sub, list) and sub and isinstance(sub[0], _BLOCKS):
                yield from _nested_defs(sub, prefix)


def _reference_topics(tree: ast.Module) -> Iterator[Tuple[str, str]]:
    """The (topic, text) pairs of pydoc_data/topics.py's ``topics = {...}`` literal."""
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Dict):
            for key, value in zip(stmt.value.keys, stmt.value.values):
                if isinstance(key, ast.Constant) and isinstance(value, ast.Constant):
                    yield str(key.value), str(value.value)


def iter_documents(root: Optional[str] = None) -> Iterator[dict]:
    """Yield {"text", "source"} documents, each text once, in a deterministic order."""
    root = root or stdlib_dir()
    seen = set()
    for path, module in _source_files(root):
        with open(path, "rb") as f:
            source = f.read()
        try:
            tree = ast.parse(source, filename=path)
        except (SyntaxError, ValueError):  # e.g. lib2to3 fixtures written in Python 2
            continue
        if module == "pydoc_data.topics":
            items = ((f"{module}:{topic}", text.strip()) for topic, text in _reference_topics(tree))
        else:
            items = ((f"{module}:{name}" if name else module, ast.get_docstring(node))
                     for name, node in [("", tree), *_nested_defs(tree.body, "")])
        for source_name, text in items:
            if text and len(text) >= _MIN_CHARS and text not in seen:
                seen.add(text)
                yield {"text": text, "source": source_name}


@dataclass
class CorpusStats:
    """What :func:`write_sample_corpus` wrote."""

    path: str
    documents: int
    bytes: int
    unique_documents: int  # documents before any repetition
    repeats: int  # how many times the unique documents were cycled through (1 = no repetition)


def write_sample_corpus(path: str, max_bytes: Optional[int] = None,
                        max_docs: Optional[int] = None, root: Optional[str] = None) -> CorpusStats:
    """Write a JSONL corpus of standard-library docstrings to ``path``.

    Args:
        path: output .jsonl file (its folder must exist).
        max_bytes: stop before the file would exceed this many bytes (at least one document
            is written).
        max_docs: stop after this many documents. At least one of the two limits is required;
            when both are given, the first reached wins.
        root: the library folder to read (default: this interpreter's standard library).

    Lines are ``{"text": ..., "source": "module:qualname"}``. When the limits ask for more than
    the library holds, documents repeat in the same order (``CorpusStats.repeats`` > 1).
    """
    if max_bytes is None and max_docs is None:
        raise ValueError("write_sample_corpus: give max_bytes or max_docs")
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"write_sample_corpus: max_bytes must be positive, got {max_bytes}")
    if max_docs is not None and max_docs <= 0:
        raise ValueError(f"write_sample_corpus: max_docs must be positive, got {max_docs}")

    lines = []  # encoded JSONL lines of the first pass, to cycle through when asked for more
    written_docs = written_bytes = 0

    def room_for(line: bytes) -> bool:
        if max_docs is not None and written_docs >= max_docs:
            return False
        return max_bytes is None or written_docs == 0 or written_bytes + len(line) <= max_bytes

    first_pass = (json.dumps(doc, ensure_ascii=False).encode("utf-8") + b"\n"
                  for doc in iter_documents(root))
    with open(path, "wb") as out:
        source, full = first_pass, False
        while True:
            for line in source:
                if not room_for(line):
                    full = True
                    break
                if source is first_pass:
                    lines.append(line)
                out.write(line)
                written_docs += 1
                written_bytes += len(line)
            if full:
                break
            if not lines:
                raise RuntimeError(f"no docstrings found under {root or stdlib_dir()}")
            source = iter(lines)
    repeats = -(-written_docs // len(lines))  # passes started, ceil(written / unique)
    return CorpusStats(path, written_docs, written_bytes, len(lines), repeats)


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'4MB' -> 4_000_000, '512KiB' -> 524_288, '1000' -> 1000 (bytes)."""
    match = _SIZE_RE.match(str(text))
    if not match:
        raise ValueError(f"size {text!r} is not a byte count like 4MB, 512KB, 2MiB or 100000")
    number, unit, binary = match.groups()
    base = 1024 if binary.lower().startswith("i") else 1000
    return int(float(number) * base ** " kmg".index(unit.lower() or " "))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_ntp.data.sample_corpus",
        description="Write a JSONL corpus of English text (Python standard-library docstrings), "
                    "offline and deterministic for a given Python version.")
    parser.add_argument("--out", required=True, help="output .jsonl path")
    parser.add_argument("--size", type=parse_size, default=None,
                        help="maximum size in bytes, e.g. 4MB, 512KB, 2MiB (default 2MB when "
                             "--docs is not given)")
    parser.add_argument("--docs", type=int, default=None, help="maximum number of documents")
    args = parser.parse_args(argv)
    if args.size is None and args.docs is None:
        args.size = 2_000_000
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        parser.error(f"--out {args.out}: folder {out_dir} does not exist")
    stats = write_sample_corpus(args.out, max_bytes=args.size, max_docs=args.docs)
    note = f" (the {stats.unique_documents} unique documents repeated)" if stats.repeats > 1 else ""
    print(f"wrote {stats.documents} documents, {stats.bytes:,} bytes to {stats.path}{note}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
