"""Reading JSONL input for preprocessing: input resolution, chunking, and per-chunk encoding.

The main process only reads raw bytes: it cuts each input file into chunks of whole lines
(:func:`iter_chunks`) and sends them to workers. A worker (:func:`encode_chunk`) splits the lines,
decodes and parses them, encodes the good ones in one batch call, and returns flat token arrays.
Chunk boundaries depend only on the input and ``chunk_bytes``, never on the number of workers, and
results are consumed in chunk order, which makes the output independent of ``--workers``.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

# Reasons a line is skipped, in the order they are checked. A line is kept only when every
# --json-keys value is good, so the outputs of several keys stay aligned document by document.
BAD_REASONS = (
    "blank_line",      # the line is empty or only whitespace
    "invalid_utf8",    # bytes that are not UTF-8, or a JSON "\ud800" escape (lone surrogate)
    "not_json",        # json.loads fails
    "not_object",      # valid JSON, but not an object ({...})
    "missing_key",     # the object lacks a --json-keys key
    "not_string",      # the key's value is not a string (null, number, list, ...)
    "empty_document",  # the text encodes to no tokens (beyond those added to every text)
)


def resolve_inputs(patterns: Sequence[str]) -> List[str]:
    """Expand files and globs, in the order given (each glob's matches sorted).

    Raises FileNotFoundError for a missing file or a glob matching nothing, PermissionError for an
    unreadable file, ValueError when a file is named twice (it would be tokenized twice).
    """
    if not patterns:
        raise ValueError("--input: no input files given")
    paths: List[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise FileNotFoundError(f"--input {pattern!r}: the pattern matches no file")
        else:
            if not os.path.exists(pattern):
                raise FileNotFoundError(f"--input {pattern!r}: no such file")
            if not os.path.isfile(pattern):
                raise ValueError(f"--input {pattern!r}: not a regular file")
            matches = [pattern]
        paths.extend(matches)
    seen: Dict[str, str] = {}
    for path in paths:
        real = os.path.realpath(path)
        if real in seen:
            raise ValueError(f"--input: {path!r} is named twice (also as {seen[real]!r})")
        seen[real] = path
        try:
            with open(path, "rb"):
                pass
        except OSError as err:
            raise PermissionError(f"--input {path!r}: cannot be read ({err.strerror})") from None
    return paths


@dataclass
class Chunk:
    """Whole lines of one input file."""

    index: int  # position in the input order, 0, 1, 2, ...
    file_index: int  # which input file
    first_line: int  # 1-based line number of the chunk's first line
    data: bytes  # the lines, each ending with b"\n" (except possibly the file's last line)
    bytes_done: int  # bytes of all input files read once this chunk was read (compressed for .gz)


def open_input(path: str) -> Tuple[io.BufferedIOBase, io.BufferedIOBase]:
    """(raw file, stream to read lines from); ``raw.tell()`` measures progress even for .gz."""
    raw = open(path, "rb")
    if path.endswith(".gz"):
        return raw, gzip.GzipFile(fileobj=raw, mode="rb")
    return raw, raw


def iter_chunks(paths: Sequence[str], chunk_bytes: int) -> Iterator[Chunk]:
    """Cut the inputs into chunks of about ``chunk_bytes`` bytes of whole lines."""
    index = 0
    bytes_before = 0  # sizes of the files already read
    for file_index, path in enumerate(paths):
        raw, stream = open_input(path)
        with raw, stream:
            line_no = 1
            while True:
                # read() then readline(): the chunk ends at a line end (or at the end of file).
                data = stream.read(chunk_bytes)
                if not data:
                    break
                if not data.endswith(b"\n"):
                    data += stream.readline()
                yield Chunk(index, file_index, line_no, data, bytes_before + raw.tell())
                index += 1
                line_no += data.count(b"\n")
        bytes_before += os.path.getsize(path)


@dataclass
class ChunkResult:
    """What a worker returns for one chunk (small: numpy arrays pickle as raw bytes)."""

    index: int
    lines: int  # lines in the chunk
    documents: int  # lines kept
    tokens: Dict[str, np.ndarray]  # per key: [sum of lengths] token ids, in the output dtype
    lengths: Dict[str, np.ndarray]  # per key: [documents] int64 token counts (eod included)
    # (line offset in the chunk, reason, key or "", short detail), in line order
    bad: List[Tuple[int, str, str, str]] = field(default_factory=list)


@dataclass
class EncodeOptions:
    """The per-run settings every worker needs."""

    json_keys: Tuple[str, ...]
    append_eod: bool
    eod: int
    dtype: type  # numpy dtype of the output (from the vocabulary size)


# (batch encoder, options, tokens the encoder adds to every text: len(encode([""])[0]))
_worker_state: Optional[Tuple[object, EncodeOptions, int]] = None


def init_worker(encoder_spec, options: EncodeOptions, ignore_signals: bool = True) -> None:
    """Pool initializer: build the batch encoder once per process."""
    global _worker_state
    if ignore_signals:
        import signal

        # Ctrl-C reaches the whole process group: only the main process handles it (it stops
        # the pool and removes partial output); SIGTERM from pool.terminate() must just end us.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    from megatron_ntp.data.tokenizer import make_batch_encoder

    encode = make_batch_encoder(encoder_spec)
    # A tokenizer whose post-processor adds a BOS turns "" into one token: a document is empty
    # when it encodes to no more tokens than "" does.
    _worker_state = (encode, options, len(encode([""])[0]))


def _has_lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


_raw_decode = json.JSONDecoder().raw_decode


def _loads(text: str):
    """json.loads without its per-call wrapper layers (~40% of its time on short lines)."""
    try:
        value, end = _raw_decode(text)
    except ValueError:
        return json.loads(text)  # leading whitespace, or a real error with json's message
    if end != len(text) and not text[end:].isspace():
        return json.loads(text)  # raises "Extra data" with json's message
    return value


def _parse_lines(lines: List[bytes], keys: Tuple[str, ...], first_of_file: bool):
    """Split lines into good ones and bad ones. Returns (good offsets, texts per key, bad)."""
    good: List[int] = []
    texts: Dict[str, List[str]] = {k: [] for k in keys}
    bad: List[Tuple[int, str, str, str]] = []
    for offset, line in enumerate(lines):
        if offset == 0 and first_of_file and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]  # a UTF-8 byte-order mark some editors write
        if not line or line.isspace():  # (isspace, unlike strip, copies nothing)
            bad.append((offset, "blank_line", "", ""))
            continue
        try:
            decoded = line.decode("utf-8")
        except UnicodeDecodeError as err:
            where = f"byte {err.start}: {line[err.start:err.start + 4]!r}"
            bad.append((offset, "invalid_utf8", "", where))
            continue
        try:
            record = _loads(decoded)
        except ValueError as err:
            bad.append((offset, "not_json", "", str(err)[:120]))
            continue
        if not isinstance(record, dict):
            bad.append((offset, "not_object", "", f"a JSON {type(record).__name__}"))
            continue
        problem = None
        values = []
        for key in keys:
            if key not in record:
                problem = ("missing_key", key, f"keys present: {sorted(record)[:8]}")
                break
            value = record[key]
            if not isinstance(value, str):
                problem = ("not_string", key, f"a JSON {type(value).__name__}")
                break
            # JSON may spell an unpaired surrogate as "\ud800"; it has no UTF-8 form.
            if b"\\u" in line and _has_lone_surrogate(value):
                problem = ("invalid_utf8", key, "an unpaired surrogate escape (\\ud800-\\udfff)")
                break
            # "Empty" is decided on the tokens (encode_chunk), not on the text: a text of only
            # whitespace by str.isspace (e.g. U+0085) can encode to tokens, and then it is kept.
            values.append(value)
        if problem:
            bad.append((offset, *problem))
            continue
        good.append(offset)
        for key, value in zip(keys, values):
            texts[key].append(value)
    return good, texts, bad


def encode_chunk(chunk: Chunk) -> ChunkResult:
    """Worker task: parse, validate and encode one chunk (needs :func:`init_worker` first)."""
    encode, options, added_to_every_text = _worker_state
    lines = chunk.data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the text after the last newline: nothing
    good, texts, bad = _parse_lines(lines, options.json_keys, chunk.first_line == 1)

    ids = {key: encode(texts[key]) if good else [] for key in options.json_keys}
    # A line whose text encodes to nothing under any key is dropped from every key.
    empty = {key: [len(doc) <= added_to_every_text for doc in ids[key]]
             for key in options.json_keys}
    keep = [not any(empty[key][i] for key in options.json_keys) for i in range(len(good))]
    if not all(keep):
        first_key = {i: next(k for k in options.json_keys if empty[k][i])
                     for i, kept in enumerate(keep) if not kept}
        bad.extend((good[i], "empty_document", key, "0 tokens") for i, key in first_key.items())
        bad.sort()

    tokens, lengths = {}, {}
    for key in options.json_keys:
        flat: List[int] = []
        doc_lengths: List[int] = []
        for doc_ids, kept in zip(ids[key], keep):
            if kept:
                flat.extend(doc_ids)
                if options.append_eod:
                    flat.append(options.eod)
                doc_lengths.append(len(doc_ids) + options.append_eod)
        tokens[key] = np.array(flat, dtype=options.dtype)
        lengths[key] = np.array(doc_lengths, dtype=np.int64)
    return ChunkResult(chunk.index, len(lines), sum(keep), tokens, lengths, bad)
