"""Preprocessing a large corpus in shards (one per Slurm array task) and merging them.

Shard i of K takes a contiguous run of the input files (in --input order, globs sorted), cut so
that the shards hold about equal bytes; its outputs are ``<prefix>_shard<i>_<key>_document``
with the shard's own summary. Merging concatenates the shards in order (megatron-core's
IndexedDatasetBuilder.add_index, as Megatron-LM's tools/merge_datasets.py), which gives the
same bytes as preprocessing all the inputs in one run: documents keep their input order, and the
index holds only lengths and document boundaries.

A shard is resumable: rerunning a task whose summary says "ok" for the same inputs and options,
with its outputs present, does nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from megatron_ntp.data.preprocess import (
    PreprocessOptions,
    dataset_prefix,
    output_paths,
    preprocess,
    summary_path,
)
from megatron_ntp.files import write_atomic


def shard_files(paths: Sequence[str], num_shards: int, index: int) -> List[str]:
    """The input files of shard `index` of `num_shards`: contiguous, about equal bytes, at least
    one file each."""
    if num_shards < 1 or not 0 <= index < num_shards:
        raise ValueError(f"--shard-index {index} must be in [0, --num-shards {num_shards})")
    if num_shards > len(paths):
        raise ValueError(f"--num-shards {num_shards} is more than the {len(paths)} input files "
                         f"(a shard takes whole files): use at most {len(paths)} shards")
    sizes = np.array([max(os.path.getsize(p), 1) for p in paths], float)
    ends = np.cumsum(sizes)  # [files] bytes up to and including each file
    cuts = [0]
    for i in range(1, num_shards):
        cut = int(np.searchsorted(ends, ends[-1] * i / num_shards)) + 1
        cuts.append(min(max(cut, cuts[-1] + 1), len(paths) - (num_shards - i)))
    cuts.append(len(paths))
    return list(paths[cuts[index]:cuts[index + 1]])


def shard_prefix(output_prefix: str, index: int) -> str:
    return f"{output_prefix}_shard{index:05d}"


def _same_run(saved: dict, opts: PreprocessOptions, inputs: List[str]) -> bool:
    return (saved.get("status") == "ok" and saved.get("inputs") == inputs
            and saved.get("json_keys") == list(opts.json_keys)
            and saved.get("append_eod") == opts.append_eod
            and (saved.get("tokenizer") or {}).get("model") == opts.tokenizer_model
            and all(os.path.isfile(path) for key in opts.json_keys
                    for path in output_paths(saved["output_prefix"], key).values()))


def read_summary(prefix: str) -> Optional[dict]:
    """The summary JSON beside `prefix`'s outputs, or None when there is none (or it is torn)."""
    try:
        with open(summary_path(prefix), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def preprocess_shard(opts: PreprocessOptions, num_shards: int, index: int, stream=None):
    """Preprocess shard `index` of the inputs into shard_prefix(opts.output_prefix, index).

    Returns (summary dict, done_before): a shard already finished with the same inputs and
    options is not redone."""
    from megatron_ntp.data import jsonl

    files = shard_files(jsonl.resolve_inputs(opts.inputs), num_shards, index)
    shard = dataclasses.replace(opts, inputs=files,
                                output_prefix=shard_prefix(opts.output_prefix, index))
    saved = read_summary(shard.output_prefix)
    if saved is not None and _same_run(saved, shard, files):
        return saved, True
    return dataclasses.asdict(preprocess(shard, stream=stream)), False


def merge_prefixes(prefixes: Sequence[str], output_prefix: str) -> Dict[str, int]:
    """Concatenate indexed datasets, in the order given, into output_prefix's .bin/.idx.

    Written under temporary names and renamed at the end. Returns {"documents", "tokens"}."""
    from megatron.core.datasets.indexed_dataset import (
        IndexedDataset,
        IndexedDatasetBuilder,
        get_bin_path,
        get_idx_path,
    )

    if not prefixes:
        raise ValueError("merge: no input prefix")
    dtypes = {}
    for prefix in prefixes:
        for path in (get_idx_path(prefix), get_bin_path(prefix)):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"merge: {prefix!r} has no {os.path.basename(path)}")
        dtypes[prefix] = IndexedDataset(prefix).index.dtype
    if len(set(dtypes.values())) > 1:
        raise ValueError(f"merge: the inputs have different token dtypes: "
                         f"{ {p: np.dtype(d).name for p, d in dtypes.items()} }")
    final = {"bin": get_bin_path(output_prefix), "idx": get_idx_path(output_prefix)}
    temp = {kind: f"{path}.tmp{os.getpid()}" for kind, path in final.items()}
    try:
        builder = IndexedDatasetBuilder(temp["bin"], dtype=dtypes[prefixes[0]])
        for prefix in prefixes:
            builder.add_index(prefix)
        builder.finalize(temp["idx"])
        documents, tokens = len(builder.document_indices) - 1, sum(builder.sequence_lengths)
        if os.path.exists(final["idx"]):
            os.unlink(final["idx"])  # never a new .bin beside a stale .idx
        os.replace(temp["bin"], final["bin"])
        os.replace(temp["idx"], final["idx"])
    finally:
        for path in temp.values():
            if os.path.exists(path):
                os.unlink(path)
    return {"documents": int(documents), "tokens": int(tokens)}


def _shard_summaries(output_prefix: str, num_shards: int) -> List[dict]:
    """Every shard's summary; ValueError naming the shards that are missing or not "ok"."""
    summaries = [read_summary(shard_prefix(output_prefix, i)) for i in range(num_shards)]
    missing = [i for i, s in enumerate(summaries) if s is None]
    failed = [f"{i} ({s['status']}: {s.get('error')})" for i, s in enumerate(summaries)
              if s is not None and s.get("status") != "ok"]
    if missing or failed:
        raise ValueError(f"merge: shards of {output_prefix!r} not finished: "
                         + "; ".join(filter(None, [
                             f"no summary for shard(s) {missing}" if missing else "",
                             f"failed shard(s) {failed}" if failed else ""]))
                         + " (rerun the array tasks: finished shards are not redone)")
    for field in ("json_keys", "tokenizer", "dtype", "append_eod"):
        values = {json.dumps(s[field], sort_keys=True) for s in summaries}
        if len(values) > 1:
            raise ValueError(f"merge: the shards of {output_prefix!r} differ in {field}: "
                             f"{sorted(values)}")
    return summaries


def _total_summary(output_prefix: str, summaries: List[dict], outputs: dict) -> dict:
    """One summary for the merged outputs: the shards' counts added up, and each shard's."""
    first = summaries[0]
    total = {"status": "ok", "inputs": [p for s in summaries for p in s["inputs"]],
             "output_prefix": output_prefix, "outputs": outputs,
             **{k: first[k] for k in ("json_keys", "tokenizer", "dtype", "append_eod")},
             "workers": max(s["workers"] for s in summaries), "bad_lines": {},
             "bad_examples": {}, "tokens": {k: 0 for k in first["json_keys"]}}
    for name in ("lines", "documents", "bytes_read"):
        total[name] = sum(s[name] for s in summaries)
    for s in summaries:
        for key, count in s["tokens"].items():
            total["tokens"][key] += count
        for reason, count in s["bad_lines"].items():
            total["bad_lines"][reason] = total["bad_lines"].get(reason, 0) + count
            examples = total["bad_examples"].setdefault(reason, [])
            examples += s["bad_examples"][reason][:5 - len(examples)]
    # elapsed_s: the slowest shard (they run in parallel); shard_s: the work of all of them
    total["elapsed_s"] = max(s["elapsed_s"] for s in summaries)
    total["shard_s"] = round(sum(s["elapsed_s"] for s in summaries), 3)
    total["shards"] = [{"output_prefix": s["output_prefix"], "inputs": len(s["inputs"]),
                        "documents": s["documents"], "tokens": s["tokens"],
                        "elapsed_s": s["elapsed_s"]} for s in summaries]
    return total


def merge_shards(output_prefix: str, num_shards: int) -> dict:
    """Merge the shards 0..num_shards-1 of output_prefix, key by key, into output_prefix's
    outputs, and write the summary across shards (``<output_prefix>_preprocess_summary.json``).
    Returns that summary."""
    summaries = _shard_summaries(output_prefix, num_shards)
    outputs = {}
    for key in summaries[0]["json_keys"]:
        merged = merge_prefixes([dataset_prefix(s["output_prefix"], key) for s in summaries],
                                dataset_prefix(output_prefix, key))
        if merged["tokens"] != sum(s["tokens"][key] for s in summaries):
            raise RuntimeError(f"merge: {key}: {merged['tokens']} tokens merged, the shard "
                               f"summaries count {sum(s['tokens'][key] for s in summaries)}")
        outputs[key] = output_paths(output_prefix, key)
    total = _total_summary(output_prefix, summaries, outputs)
    write_atomic(summary_path(output_prefix), json.dumps(total, indent=2) + "\n")
    return total


def _dataset_prefixes_in(folder: str) -> List[str]:
    """Megatron-LM's --input folder: every .bin/.idx pair in it, sorted by name."""
    names = sorted(os.listdir(folder))
    prefixes = sorted({os.path.splitext(n)[0] for n in names
                       if n.endswith((".bin", ".idx")) and os.path.isfile(os.path.join(folder, n))})
    for prefix in prefixes:
        for ext in (".bin", ".idx"):
            if prefix + ext not in names:
                raise FileNotFoundError(f"--input {folder}: {prefix}{ext} is missing")
    if not prefixes:
        raise FileNotFoundError(f"--input {folder}: no .bin/.idx pair in the folder")
    return [os.path.join(folder, p) for p in prefixes]


def build_merge_parser():
    import argparse

    parser = argparse.ArgumentParser(
        description="Merge megatron-core indexed datasets into one (Megatron-LM's "
                    "tools/merge_datasets.py), or the shards of a sharded preprocessing run.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+",
                        help="a folder (every .bin/.idx pair in it, in name order, as "
                             "Megatron-LM) or dataset prefixes, merged in the order given")
    source.add_argument("--shards", type=int, metavar="K",
                        help="merge shards 0..K-1 of --output-prefix (tools/preprocess_data.py "
                             "--num-shards K), every key, and write the summary across shards")
    parser.add_argument("--output-prefix", required=True,
                        help="with --input: the merged dataset's prefix (without .bin/.idx); "
                             "with --shards: preprocess_data's --output-prefix")
    return parser


def merge_main(argv=None) -> int:
    """CLI of tools/merge_datasets.py: exit 0 on success, 1 on an error."""
    import sys

    args = build_merge_parser().parse_args(argv)
    try:
        out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
        if not os.path.isdir(out_dir):
            raise FileNotFoundError(f"--output-prefix: folder {out_dir} does not exist")
        if args.shards is not None:
            total = merge_shards(args.output_prefix, args.shards)
            print(f"[merge] {args.shards} shards: {total['documents']:,} documents, tokens "
                  + ", ".join(f"{k}={v:,}" for k, v in total["tokens"].items())
                  + f"; summary {summary_path(args.output_prefix)}", file=sys.stderr)
            return 0
        inputs = args.input
        if len(inputs) == 1 and os.path.isdir(inputs[0]):
            inputs = _dataset_prefixes_in(inputs[0])
        merged = merge_prefixes(inputs, args.output_prefix)
        print(f"[merge] {len(inputs)} datasets: {merged['documents']:,} documents, "
              f"{merged['tokens']:,} tokens -> {args.output_prefix}.bin/.idx", file=sys.stderr)
        return 0
    except (OSError, ValueError, RuntimeError) as err:
        print(f"[merge] error: {err}", file=sys.stderr)
        return 1
