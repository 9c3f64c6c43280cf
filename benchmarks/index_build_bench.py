"""Building megatron-core's GPTDataset indices for a 500B-token run, measured by simulation.

Each prefix of the blend is an .idx describing its share of the tokens in documents of
realistic lengths (log-normal, mean --mean-doc-tokens, median about 0.6 of it, clipped to
[16, 256k]) beside a sparse .bin of the right size (no disk spent on tokens: building the
indices reads only the .idx). Then, in fresh processes:

rank 0:       BlendedMegatronDatasetBuilder + GPTDataset (megatron-core's own code, as
              megatron_ntp.data.build_datasets calls it) for --tokens of training at --seq, a
              valid split of --valid-fraction; builds and writes the document, sample and shuffle
              indices and the blend's indices to the cache. Wall time and peak RSS.
other rank:   the same call with the cache present (what every other rank does after the
              barrier): load time and peak RSS.

There is no baseline: this is megatron-core's code itself. Prints the CPU model.

    python benchmarks/index_build_bench.py [--tokens 500e9] [--prefixes 4] [--seq 4096]
        [--mean-doc-tokens 1000] [--folder /tmp/index_bench]
"""

import argparse
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import time
import warnings

import numpy as np
from machine import cpu_model  # benchmarks/machine.py (this folder is sys.path[0])

# megatron-core's .idx layout (indexed_dataset._IndexWriter): header, version, dtype code,
# sequence count, document count, then int32 lengths, int64 byte pointers, int64 document
# starts. Written here in chunks: _IndexWriter takes whole Python lists (600M documents).
INDEX_HEADER = b"MMIDIDX\x00\x00"
INT32_CODE = 4  # megatron-core's DType.int32 (a vocabulary above 65,500, e.g. Qwen3's)
CHUNK = 1 << 24  # documents per write


def document_lengths(tokens: float, mean: float, seed: int) -> np.ndarray:
    """[documents] int32 token counts adding up to about `tokens`."""
    rng = np.random.default_rng(seed)
    sigma = 1.0
    mu = np.log(mean) - sigma**2 / 2
    parts, total = [], 0
    while total < tokens:
        part = np.clip(rng.lognormal(mu, sigma, CHUNK), 16, 1 << 18).astype(np.int32)
        cum = np.cumsum(part, dtype=np.int64)
        if total + cum[-1] >= tokens:
            part = part[:int(np.searchsorted(cum, tokens - total)) + 1]
        parts.append(part)
        total += int(part.sum(dtype=np.int64))
    return np.concatenate(parts)


def write_simulated_prefix(prefix: str, lengths: np.ndarray) -> int:
    """The .idx for `lengths` and a sparse .bin; returns the .bin's apparent size."""
    count = len(lengths)
    with open(prefix + ".idx", "wb") as f:
        f.write(INDEX_HEADER + struct.pack("<Q", 1) + struct.pack("<B", INT32_CODE))
        f.write(struct.pack("<Q", count) + struct.pack("<Q", count + 1))
        f.write(lengths.tobytes())
        offset = 0
        for start in range(0, count, CHUNK):
            part = lengths[start:start + CHUNK].astype(np.int64) * 4  # bytes per document
            pointers = np.cumsum(part) - part + offset
            offset += int(part.sum())
            f.write(pointers.tobytes())
        for start in range(0, count + 1, CHUNK):
            f.write(np.arange(start, min(start + CHUNK, count + 1), dtype=np.int64).tobytes())
    with open(prefix + ".bin", "wb") as f:
        f.truncate(offset)  # sparse: no block is written
    return offset


class SimulatedTokenizer:
    """What GPTDatasetConfig reads of a tokenizer (a Qwen3-size vocabulary)."""

    vocab_size = 151_936
    eod = 151_643
    pad = 151_643
    unique_identifiers = {"class": "SimulatedTokenizer"}


def build(prefixes, cache, seq, train_samples, valid_samples) -> dict:
    """One rank's call (megatron-core's builder, no process group: it builds or loads)."""
    warnings.filterwarnings("ignore")
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    config = GPTDatasetConfig(
        random_seed=1234, sequence_length=seq,
        blend=(prefixes, [1.0] * len(prefixes)), split="998,2,0", path_to_cache=cache,
        tokenizer=SimulatedTokenizer(), reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=False)
    start = time.perf_counter()
    train, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [train_samples, valid_samples, 0], lambda: True, config).build()
    elapsed = time.perf_counter() - start
    sample = train[len(train) - 1]  # touch the indices end to end (reads the sparse .bin: zeros)
    assert sample["tokens"].shape == (seq,)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    # CPU seconds hardly move when other jobs compete for the cores; wall seconds do.
    return {"seconds": elapsed, "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "peak_rss_gib": usage.ru_maxrss / 2**20, "train": len(train), "valid": len(valid)}


def run_rank(args, name):
    """A fresh process (its own peak RSS) running `build`."""
    command = [sys.executable, __file__, *sys.argv[1:], "--_rank", name]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])



def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=float, default=500e9, help="tokens of training")
    parser.add_argument("--prefixes", type=int, default=4, help="prefixes in the blend")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--mean-doc-tokens", type=float, default=1000)
    parser.add_argument("--valid-fraction", type=float, default=0.001)
    parser.add_argument("--folder", default="/tmp/index_bench")
    parser.add_argument("--keep", action="store_true", help="keep the simulated files")
    parser.add_argument("--_rank", help=argparse.SUPPRESS)
    args = parser.parse_args()
    prefixes = [os.path.join(args.folder, f"part{i}_text_document")
                for i in range(args.prefixes)]
    train_samples = int(args.tokens // args.seq)
    valid_samples = max(1, int(train_samples * args.valid_fraction))
    if args._rank:
        print(json.dumps(build(prefixes, os.path.join(args.folder, "cache"), args.seq,
                               train_samples, valid_samples)))
        return
    print(f"CPU: {cpu_model()} ({os.cpu_count()} cores), load average "
          f"{os.getloadavg()[0]:.1f} at the start")
    shutil.rmtree(args.folder, ignore_errors=True)
    os.makedirs(args.folder)
    # Each prefix holds its share plus 1% (the 99.8% train split must cover the run's tokens
    # in one epoch, as a corpus sized for its run does).
    start, documents, apparent = time.perf_counter(), 0, 0
    for i, prefix in enumerate(prefixes):
        lengths = document_lengths(args.tokens / args.prefixes * 1.01, args.mean_doc_tokens, i)
        documents += len(lengths)
        apparent += write_simulated_prefix(prefix, lengths)
        del lengths
    index_gib = sum(os.path.getsize(p + ".idx") for p in prefixes) / 2**30
    print(f"simulated {args.prefixes} prefixes: {documents:,} documents, "
          f"{apparent / 4:.3e} tokens ({apparent / 2**40:.2f} TiB of sparse .bin), "
          f".idx {index_gib:.2f} GiB, written in {time.perf_counter() - start:.0f} s")
    print(f"run: {args.tokens:.3e} tokens = {train_samples:,} samples of {args.seq}, "
          f"{valid_samples:,} valid samples")
    first = run_rank(args, "rank 0")
    print(f"rank 0 (builds, writes the cache): {first['seconds']:.1f} s "
          f"({first['cpu_seconds']:.0f} CPU s in the process), peak RSS "
          f"{first['peak_rss_gib']:.2f} GiB")
    other = run_rank(args, "other rank")
    print(f"other rank (loads the cache):      {other['seconds']:.1f} s "
          f"({other['cpu_seconds']:.0f} CPU s in the process), peak RSS "
          f"{other['peak_rss_gib']:.2f} GiB")
    cache = os.path.join(args.folder, "cache")
    cache_gib = sum(os.path.getsize(os.path.join(cache, n)) for n in os.listdir(cache)) / 2**30
    print(f"cache: {cache_gib:.2f} GiB in {cache}")
    if not args.keep:
        shutil.rmtree(args.folder)


if __name__ == "__main__":
    main()
