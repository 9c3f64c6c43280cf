"""JSONL -> megatron-core indexed datasets (``<prefix>_<key>_document.bin/.idx``).

Megatron-LM's tools/preprocess_data.py, with the same options (--input, --json-keys,
--tokenizer-type, --tokenizer-model, --output-prefix, --workers, --append-eod, --log-interval) and
these guarantees:

- Deterministic: the output bytes do not depend on --workers (chunks of whole lines are encoded in
  parallel and written in input order).
- Bad lines (see ``jsonl.BAD_REASONS``) are skipped and counted by reason, with the first
  ``file:line`` locations in the final report and in ``<prefix>_preprocess_summary.json``;
  ``--strict`` stops at the first one instead.
- Output is written under temporary names and renamed only after everything succeeded: a failed or
  interrupted run (exception, Ctrl-C, SIGTERM) leaves no .bin/.idx pair.
- Missing or unreadable inputs, a missing tokenizer model and an unwritable output location are
  reported before any encoding starts.

Pipeline: the main process reads raw chunks (``jsonl.iter_chunks``), keeps a bounded window of them
in flight in a process pool, and appends each result, in order, to megatron-core's
IndexedDatasetBuilder. Workers return flat numpy token arrays per chunk, so the main process does
little besides writing.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

from megatron_ntp.data import jsonl
from megatron_ntp.data.tokenizer_types import TOKENIZER_TYPES, canonical_tokenizer_type
from megatron_ntp.files import write_atomic

MAX_LOCATIONS_PER_REASON = 5  # file:line examples kept for each bad-input reason


class BadInputError(ValueError):
    """--strict: a line that would have been skipped. The message starts with ``file:line``."""


class Interrupted(BaseException):
    """SIGTERM (e.g. Slurm cancelling): unwinds like KeyboardInterrupt, removing partial output."""


@dataclass
class PreprocessOptions:
    """Everything a run needs; the CLI flags map one to one onto these fields."""

    inputs: List[str]
    output_prefix: str
    tokenizer_type: str
    tokenizer_model: str
    json_keys: List[str] = field(default_factory=lambda: ["text"])
    workers: int = 1
    append_eod: bool = False
    log_interval: int = 1000  # documents between progress lines (0: no progress lines)
    strict: bool = False
    # Input bytes per worker task: ~50k tokens, 30-60 ms of encoding. Large enough that the
    # inter-process traffic costs nothing; small enough that workers finish together at the end.
    chunk_bytes: int = 1 << 18


@dataclass
class PreprocessSummary:
    """The report of a run, also written as ``<prefix>_preprocess_summary.json``."""

    status: str  # "ok", "failed" or "interrupted"
    inputs: List[str]
    output_prefix: str
    outputs: Dict[str, Dict[str, str]]  # key -> {"bin": path, "idx": path} (empty unless "ok")
    json_keys: List[str]
    tokenizer: Dict[str, object]
    dtype: str
    append_eod: bool
    workers: int
    lines: int = 0
    documents: int = 0
    tokens: Dict[str, int] = field(default_factory=dict)
    bad_lines: Dict[str, int] = field(default_factory=dict)  # reason -> count
    bad_examples: Dict[str, List[str]] = field(default_factory=dict)  # reason -> ["file:line ..."]
    bytes_read: int = 0
    elapsed_s: float = 0.0
    tokens_per_s: float = 0.0
    error: Optional[str] = None

    @property
    def total_bad(self) -> int:
        return sum(self.bad_lines.values())


def dataset_prefix(prefix: str, key: str) -> str:
    """Megatron-LM's naming: the dataset of `key` is ``<prefix>_<key>_document``."""
    return f"{prefix}_{key}_document"


def output_paths(prefix: str, key: str) -> Dict[str, str]:
    """``<prefix>_<key>_document.bin`` and ``.idx``."""
    base = dataset_prefix(prefix, key)
    return {"bin": base + ".bin", "idx": base + ".idx"}


def summary_path(prefix: str) -> str:
    return f"{prefix}_preprocess_summary.json"


class _Writer:
    """One output: megatron-core's IndexedDatasetBuilder writing under temporary names.

    Documents arrive as a flat token array plus lengths per chunk; appending them in bulk writes
    exactly what add_item() + end_document() per document would (one sequence per document),
    without a Python call per document.
    """

    def __init__(self, prefix: str, key: str, dtype) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.final = output_paths(prefix, key)
        tag = f".tmp{os.getpid()}"
        self.temp = {kind: path + tag for kind, path in self.final.items()}
        try:
            self.builder = IndexedDatasetBuilder(self.temp["bin"], dtype=dtype)
        except OSError as err:
            raise PermissionError(
                f"--output-prefix: cannot write {self.temp['bin']} ({err.strerror})") from None

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        builder = self.builder
        builder.data_file.write(tokens.tobytes(order="C"))
        first = len(builder.sequence_lengths)
        builder.sequence_lengths.extend(lengths.tolist())
        # document_indices[d + 1] = sequences in documents 0..d; one sequence per document here.
        builder.document_indices.extend(range(first + 1, first + len(lengths) + 1))

    def finish(self) -> None:
        self.builder.finalize(self.temp["idx"])

    def publish(self) -> None:
        """Rename into place. The old .idx goes first, so a crash between the two renames can
        leave a lone .bin but never a new .bin paired with a stale .idx."""
        if os.path.exists(self.final["idx"]):
            os.unlink(self.final["idx"])
        os.replace(self.temp["bin"], self.final["bin"])
        os.replace(self.temp["idx"], self.final["idx"])

    def discard(self) -> None:
        if not self.builder.data_file.closed:
            self.builder.data_file.close()
        for path in self.temp.values():
            if os.path.exists(path):
                os.unlink(path)


def _check_options(opts: PreprocessOptions) -> None:
    if not opts.json_keys or any(not k for k in opts.json_keys):
        raise ValueError(f"--json-keys must name at least one non-empty key, got {opts.json_keys}")
    if len(set(opts.json_keys)) != len(opts.json_keys):
        raise ValueError(f"--json-keys names a key twice: {opts.json_keys}")
    if opts.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {opts.workers}")
    if opts.log_interval < 0:
        raise ValueError(f"--log-interval must be >= 0, got {opts.log_interval}")
    if opts.chunk_bytes < 1:
        raise ValueError(f"--chunk-bytes must be positive, got {opts.chunk_bytes}")
    out_dir = os.path.dirname(os.path.abspath(opts.output_prefix))
    if not os.path.isdir(out_dir):
        raise FileNotFoundError(f"--output-prefix {opts.output_prefix!r}: folder {out_dir} "
                                f"does not exist")
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise PermissionError(f"--output-prefix {opts.output_prefix!r}: folder {out_dir} "
                              f"is not writable")


class _Progress:
    """Progress lines: documents, tokens, tokens/s, bytes read and an ETA from bytes read."""

    def __init__(self, interval: int, total_bytes: int, stream) -> None:
        self.interval, self.total_bytes, self.stream = interval, max(total_bytes, 1), stream
        self.start = time.perf_counter()
        self.next_at = interval

    def update(self, documents: int, tokens: int, bytes_done: int) -> None:
        if not self.interval or documents < self.next_at:
            return
        self.next_at = (documents // self.interval + 1) * self.interval
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        fraction = min(bytes_done / self.total_bytes, 1.0)
        eta = elapsed * (1 - fraction) / fraction if fraction > 0 else float("nan")
        print(f"[preprocess] {documents:,} docs | {tokens:,} tokens | "
              f"{tokens / elapsed / 1e6:.2f}M tokens/s | {fraction:6.1%} of "
              f"{self.total_bytes / 1e6:,.1f} MB read | ETA {_format_seconds(eta)}",
              file=self.stream, flush=True)


def _format_seconds(seconds: float) -> str:
    if seconds != seconds:
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class WorkerDied(RuntimeError):
    """A worker process ended abruptly (killed, e.g. by the OOM killer, or crashed)."""


def _results_in_order(opts: PreprocessOptions, inputs: List[str], chunks, encoder_spec,
                      encode_options):
    """Yield (chunk, ChunkResult) in input order, encoding up to a bounded window in parallel."""
    if opts.workers == 1:
        jsonl.init_worker(encoder_spec, encode_options, ignore_signals=False)
        for chunk in chunks:
            yield chunk, jsonl.encode_chunk(chunk)
        return
    # ProcessPoolExecutor rather than multiprocessing.Pool: when a worker dies, Pool silently
    # replaces it and waits forever for the lost task; the executor raises BrokenProcessPool.
    # fork: workers start at once and inherit the imported modules (no 5 s megatron-core import).
    # They are forked before anything is written, and end with os._exit, so they never flush a
    # copy of the output file's buffer.
    executor = ProcessPoolExecutor(opts.workers, mp_context=multiprocessing.get_context("fork"),
                                   initializer=jsonl.init_worker,
                                   initargs=(encoder_spec, encode_options))
    finished = False
    window = collections.deque()  # (chunk without its data, Future), oldest first
    max_in_flight = 4 * opts.workers  # bounds memory; enough to keep every worker busy

    def oldest():
        done, future = window.popleft()
        try:
            return done, future.result()
        except BrokenProcessPool:
            # Every pending chunk fails with the pool, so this is where encoding stopped, not
            # necessarily the chunk that killed the worker.
            raise WorkerDied(f"a worker process died unexpectedly (killed, or out of memory?); "
                             f"input from {inputs[done.file_index]}:{done.first_line} on was not "
                             f"encoded") from None

    try:
        for chunk in chunks:
            future = executor.submit(jsonl.encode_chunk, chunk)
            # Keep only the chunk's location: its data is pickled to a worker in the background.
            window.append((dataclasses.replace(chunk, data=b""), future))
            if len(window) >= max_in_flight:
                yield oldest()
        while window:
            yield oldest()
        finished = True
    finally:
        if not finished:
            # Failure or interruption: stop busy workers now instead of letting them finish their
            # chunks. (_processes is private, but has been there since Python 3.2.)
            for process in list((getattr(executor, "_processes", None) or {}).values()):
                process.terminate()
        executor.shutdown(wait=True, cancel_futures=True)


def _sigterm_as_exception(signum, frame):
    raise Interrupted(f"received signal {signum}")


def _prepare(opts: PreprocessOptions):
    """(inputs, tokenizer, dtype, encode options, a "failed" summary to fill in). Everything
    that can fail without reading input fails here, before any work; the cheap checks even
    before megatron-core's import (~5 s)."""
    _check_options(opts)
    inputs = jsonl.resolve_inputs(opts.inputs)
    try:
        canonical_tokenizer_type(opts.tokenizer_type)
    except ValueError as err:
        raise ValueError(f"--tokenizer-type: {err}") from None
    if not os.path.exists(opts.tokenizer_model):
        raise FileNotFoundError(f"--tokenizer-model {opts.tokenizer_model!r}: no such file")

    from megatron.core.datasets.indexed_dataset import DType

    from megatron_ntp.data.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(opts.tokenizer_type, opts.tokenizer_model)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)  # uint16 below 65,500 tokens, else int32
    encode_options = jsonl.EncodeOptions(tuple(opts.json_keys), opts.append_eod,
                                         int(tokenizer.eod), dtype)
    summary = PreprocessSummary(
        status="failed", inputs=inputs, output_prefix=opts.output_prefix, outputs={},
        json_keys=list(opts.json_keys),
        tokenizer={"type": opts.tokenizer_type, "model": opts.tokenizer_model,
                   "vocab_size": int(tokenizer.vocab_size), "eod": int(tokenizer.eod)},
        dtype=np.dtype(dtype).name, append_eod=opts.append_eod, workers=opts.workers)
    return inputs, tokenizer, dtype, encode_options, summary


def _count_bad_lines(summary: PreprocessSummary, bad, path: str, first_line: int,
                     strict: bool) -> None:
    """Count a chunk's skipped lines by reason, keeping the first locations; with --strict the
    first one is an error naming its file and line."""
    for offset, reason, key, detail in bad:
        where = f"{path}:{first_line + offset}"
        what = reason + (f" (key {key!r})" if key else "") + (f": {detail}" if detail else "")
        if strict:
            raise BadInputError(f"{where}: {what}")
        summary.bad_lines[reason] = summary.bad_lines.get(reason, 0) + 1
        examples = summary.bad_examples.setdefault(reason, [])
        if len(examples) < MAX_LOCATIONS_PER_REASON:
            examples.append(f"{where}: {what}")


def _count_read_until_first_bad(summary: PreprocessSummary, tokens: Dict[str, int],
                                result) -> None:
    """--strict stops at the chunk's first bad line: count the lines read up to it (itself
    included) and the documents before it (every line before it in the chunk is one) with
    their tokens, for the failed run's summary."""
    offset = result.bad[0][0]
    summary.lines += offset + 1
    summary.documents += offset
    for key in tokens:
        tokens[key] += int(result.lengths[key][:offset].sum())


def preprocess(opts: PreprocessOptions, stream=None) -> PreprocessSummary:
    """Run the conversion; returns the summary (also written beside the output).

    Progress lines go to ``stream`` (default: sys.stderr).

    Raises the first error (FileNotFoundError, PermissionError, ValueError, BadInputError with
    --strict, KeyboardInterrupt, Interrupted) after removing partial output and writing the
    summary with status "failed"/"interrupted" when the output folder is usable.
    """
    inputs, tokenizer, dtype, encode_options, summary = _prepare(opts)
    tokens = {key: 0 for key in opts.json_keys}
    writers: List[_Writer] = []
    results = None
    start = time.perf_counter()

    # SIGTERM unwinds like Ctrl-C (only possible from the main thread of the main interpreter).
    previous_handler = None
    if threading.current_thread() is threading.main_thread():
        previous_handler = signal.signal(signal.SIGTERM, _sigterm_as_exception)
    try:
        for key in opts.json_keys:
            writers.append(_Writer(opts.output_prefix, key, dtype))
        total_bytes = sum(os.path.getsize(p) for p in inputs)
        progress = _Progress(opts.log_interval, total_bytes, stream or sys.stderr)
        chunks = jsonl.iter_chunks(inputs, opts.chunk_bytes)
        results = _results_in_order(opts, inputs, chunks, tokenizer.encoder_spec,
                                    encode_options)
        for chunk, result in results:
            if opts.strict and result.bad:
                _count_read_until_first_bad(summary, tokens, result)
            _count_bad_lines(summary, result.bad, inputs[chunk.file_index], chunk.first_line,
                             opts.strict)
            for writer, key in zip(writers, opts.json_keys):
                writer.add(result.tokens[key], result.lengths[key])
                tokens[key] += int(result.tokens[key].size)
            summary.lines += result.lines
            summary.documents += result.documents
            summary.bytes_read = chunk.bytes_done
            progress.update(summary.documents, tokens[opts.json_keys[0]], chunk.bytes_done)
        if summary.documents == 0:
            raise ValueError(f"no valid documents in {len(inputs)} input file(s) "
                             f"({summary.lines} lines; skipped: {summary.bad_lines})")
        for writer in writers:
            writer.finish()
        for writer in writers:
            writer.publish()
        summary.status = "ok"
        summary.outputs = {key: w.final for key, w in zip(opts.json_keys, writers)}
        return summary
    except (KeyboardInterrupt, Interrupted) as err:
        summary.status, summary.error = "interrupted", f"{type(err).__name__}: {err}"
        raise
    except BaseException as err:
        summary.error = f"{type(err).__name__}: {err}"
        raise
    finally:
        if results is not None:
            results.close()  # stops the worker pool now, not when garbage collected
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
        for writer in writers:
            writer.discard()
        summary.tokens = tokens
        summary.elapsed_s = round(time.perf_counter() - start, 3)
        summary.tokens_per_s = round(tokens[opts.json_keys[0]] / max(summary.elapsed_s, 1e-9), 1)
        if writers:  # the output folder proved writable
            _write_summary(summary)


def _write_summary(summary: PreprocessSummary) -> None:
    write_atomic(summary_path(summary.output_prefix), json.dumps(asdict(summary), indent=2) + "\n")


def format_report(summary: PreprocessSummary) -> str:
    """The human-readable final report (counts, bad lines by reason with locations, outputs)."""
    lines = [
        f"[preprocess] {summary.status}: {summary.documents:,} documents from "
        f"{summary.lines:,} lines, tokens "
        + ", ".join(f"{k}={v:,}" for k, v in summary.tokens.items())
        + f", {summary.elapsed_s:.1f} s ({summary.tokens_per_s / 1e6:.2f}M tokens/s)"
    ]
    if summary.bad_lines:
        lines.append(f"[preprocess] skipped {summary.total_bad:,} bad line(s):")
        for reason in jsonl.BAD_REASONS:
            if reason in summary.bad_lines:
                lines.append(f"  {reason}: {summary.bad_lines[reason]:,}")
                lines.extend(f"    {example}" for example in summary.bad_examples[reason])
    for key, paths in summary.outputs.items():
        lines.append(f"[preprocess] wrote {paths['bin']} and {paths['idx']}")
    if summary.status != "failed" or summary.outputs:
        lines.append(f"[preprocess] summary: {summary_path(summary.output_prefix)}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Tokenize JSONL files into megatron-core indexed datasets "
                    "(<output-prefix>_<key>_document.bin/.idx).")
    group = parser.add_argument_group("input data")
    group.add_argument("--input", nargs="+", required=True,
                       help="JSONL files or globs (quote them); .gz files are decompressed")
    group.add_argument("--json-keys", nargs="+", default=["text"],
                       help="keys to extract from each JSON line (default: text); one output "
                            "per key, and a line is kept only if every key is valid")
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", required=True,
                       help=f"one of {', '.join(TOKENIZER_TYPES)} (or sentencepiece, huggingface)")
    group.add_argument("--tokenizer-model", required=True,
                       help="sentencepiece .model file, or a tokenizer.json file or its folder")
    group.add_argument("--append-eod", action="store_true",
                       help="append the end-of-document token to every document")
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True,
                       help="path prefix of the outputs; its folder must exist")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                       help="encoding processes (default: the CPUs available); the output is "
                            "the same for any value")
    group.add_argument("--log-interval", type=int, default=1000,
                       help="print progress every this many documents (0: never)")
    group.add_argument("--strict", action="store_true",
                       help="stop at the first bad line (naming file:line) instead of skipping it")
    group.add_argument("--chunk-bytes", type=int, default=1 << 18,
                       help="input bytes per worker task (tuning only; output does not depend "
                            "on it)")
    group = parser.add_argument_group("shards (one per Slurm array task; see slurm/README.md)")
    group.add_argument("--num-shards", type=int, default=1,
                       help="split the input files into this many shards of contiguous files "
                            "(about equal bytes); merge them with tools/merge_datasets.py")
    group.add_argument("--shard-index", type=int, default=None,
                       help="the shard to preprocess (0-based); its outputs are "
                            "<output-prefix>_shard<index>_...; a shard already finished with "
                            "the same inputs and options is skipped")
    return parser


def _shard_index(args) -> Optional[int]:
    if args.num_shards == 1 and args.shard_index is None:
        return None
    if args.shard_index is None:
        raise ValueError(f"--num-shards {args.num_shards} needs --shard-index")
    return args.shard_index


def _run_shard(opts: PreprocessOptions, num_shards: int, index: int) -> int:
    from megatron_ntp.data.shards import preprocess_shard

    saved, done_before = preprocess_shard(opts, num_shards, index)
    if done_before:
        print(f"[preprocess] shard {index} of {num_shards} was finished before "
              f"({saved['documents']:,} documents); nothing to do. Summary: "
              f"{summary_path(saved['output_prefix'])}", file=sys.stderr)
    else:
        print(format_report(PreprocessSummary(**saved)), file=sys.stderr)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry: exit 0 on success, 1 on an error, 130 when interrupted."""
    args = build_parser().parse_args(argv)
    opts = PreprocessOptions(
        inputs=args.input, output_prefix=args.output_prefix, tokenizer_type=args.tokenizer_type,
        tokenizer_model=args.tokenizer_model, json_keys=args.json_keys, workers=args.workers,
        append_eod=args.append_eod, log_interval=args.log_interval, strict=args.strict,
        chunk_bytes=args.chunk_bytes)
    try:
        shard = _shard_index(args)
        if shard is not None:
            return _run_shard(opts, args.num_shards, shard)
        summary = preprocess(opts)
    except (KeyboardInterrupt, Interrupted) as err:
        print(f"[preprocess] interrupted ({type(err).__name__}); no output written",
              file=sys.stderr)
        return 130
    except (OSError, ValueError, RuntimeError) as err:
        print(f"[preprocess] error: {err}", file=sys.stderr)
        return 1
    print(format_report(summary), file=sys.stderr)
    return 0
