"""Preprocessing throughput against the raw tokenizer, on the same text, in one run.

raw:        a pool of N processes (started and warmed before timing, the texts already in their
            memory) encodes the documents' texts in batches with sentencepiece's batch encode (one
            thread each) and returns flat uint16 arrays: the tokenizer's own speed with N
            processes.
preprocess: megatron_ntp.data.preprocess with --workers N on the JSONL file holding the same
            documents, timed end to end (reading, JSON parsing, validation, encoding, writing the
            .bin/.idx, renaming, the summary file; pool start included).

Rounds alternate raw and preprocess; the best of each and the median of the per-round ratios are
reported, because the machine may be shared. Tokens per CPU-second (all processes, pool start
included) are printed too: unlike wall-clock rates they hardly move when other jobs compete for
the cores. Defaults: an 8k sentencepiece BPE model trained on the offline sample corpus, 2 workers.

    python benchmarks/preprocess_bench.py [--size 16MB] [--workers 2] [--rounds 3]
"""

import argparse
import json
import multiprocessing
import os
import resource
import sys
import tempfile
import time
import warnings

import numpy as np

warnings.filterwarnings("ignore", message=".*(Transformer Engine|absl).*")

_processor = None
_texts = None  # the documents' texts, set before the raw pool is forked so workers share them


def _init_raw(model_path):
    global _processor
    import sentencepiece

    _processor = sentencepiece.SentencePieceProcessor(model_file=model_path)


def _raw_encode(span):
    start, end = span
    flat = []
    for ids in _processor.encode(_texts[start:end], num_threads=1):
        flat.extend(ids)
    return np.array(flat, dtype=np.uint16)


def cpu_seconds():
    """CPU time of this process and its reaped children (pool workers are reaped at shutdown)."""
    own, children = (resource.getrusage(w) for w in (resource.RUSAGE_SELF,
                                                      resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def raw_throughput(model_path, texts, workers, batch_docs):
    """tokens/s of the bare tokenizer with ``workers`` processes.

    The strictest baseline: the texts are already in the workers' memory (inherited by fork, no
    pickling), the pool is started and the model loaded before timing; only the span of each
    batch goes to a worker and a flat uint16 array comes back.
    """
    global _texts
    _texts = texts
    spans = [(i, min(i + batch_docs, len(texts))) for i in range(0, len(texts), batch_docs)]
    with multiprocessing.get_context("fork").Pool(workers, _init_raw, (model_path,)) as pool:
        pool.map(_raw_encode, [(0, 1)] * workers)  # warm-up
        start = time.perf_counter()
        arrays = pool.map(_raw_encode, spans, chunksize=1)
        elapsed = time.perf_counter() - start
    tokens = sum(a.size for a in arrays)
    return tokens, tokens / elapsed


def preprocess_throughput(corpus, model_path, workers, out_dir):
    from megatron_ntp.data.preprocess import PreprocessOptions, preprocess

    opts = PreprocessOptions(inputs=[corpus], output_prefix=os.path.join(out_dir, "bench"),
                             tokenizer_type="sentencepiece", tokenizer_model=model_path,
                             workers=workers, log_interval=0)
    start = time.perf_counter()
    summary = preprocess(opts)
    elapsed = time.perf_counter() - start
    tokens = summary.tokens["text"]
    return tokens, tokens / elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="16MB", help="corpus size (sample corpus)")
    parser.add_argument("--input", default=None, help="a JSONL file instead of the sample corpus")
    parser.add_argument("--tokenizer-model", default=None,
                        help="a sentencepiece model instead of training an 8k BPE one")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-docs", type=int, default=512, help="raw: documents per task")
    args = parser.parse_args()

    from megatron_ntp.data.sample_corpus import parse_size, write_sample_corpus
    from megatron_ntp.data.tokenizer import build_tokenizer
    from megatron_ntp.data.train_tokenizer import train_sentencepiece

    with tempfile.TemporaryDirectory(prefix="preprocess_bench_") as work:
        corpus = args.input
        if corpus is None:
            corpus = os.path.join(work, "corpus.jsonl")
            write_sample_corpus(corpus, max_bytes=parse_size(args.size))
        model = args.tokenizer_model
        if model is None:
            model = train_sentencepiece([corpus], os.path.join(work, "spm"), vocab_size=8000,
                                        sample_size=300_000)
        build_tokenizer("sentencepiece", model)  # imports megatron-core once, outside the timings
        with open(corpus, encoding="utf-8") as f:
            texts = [json.loads(line)["text"] for line in f]
        print(f"corpus: {len(texts):,} documents, {os.path.getsize(corpus) / 1e6:.1f} MB; "
              f"workers: {args.workers}; cpus: {len(os.sched_getaffinity(0))}")

        best_raw = best_pre = 0.0
        ratios = []
        cpu_raw = cpu_pre = 0.0
        for round_index in range(args.rounds):
            cpu = cpu_seconds()
            raw_tokens, raw = raw_throughput(model, texts, args.workers, args.batch_docs)
            cpu_raw += cpu_seconds() - cpu
            cpu = cpu_seconds()
            pre_tokens, pre = preprocess_throughput(corpus, model, args.workers, work)
            cpu_pre += cpu_seconds() - cpu
            if raw_tokens != pre_tokens:
                sys.exit(f"token counts differ: raw {raw_tokens} vs preprocess {pre_tokens}")
            ratios.append(pre / raw)
            print(f"round {round_index + 1}: raw {raw / 1e6:.2f}M tokens/s, "
                  f"preprocess {pre / 1e6:.2f}M tokens/s, ratio {pre / raw:.3f} "
                  f"({raw_tokens:,} tokens)")
            best_raw, best_pre = max(best_raw, raw), max(best_pre, pre)

    print(f"raw tokenizer, {args.workers} processes: {best_raw / 1e6:.2f}M tokens/s")
    print(f"preprocess, --workers {args.workers}:   {best_pre / 1e6:.2f}M tokens/s")
    print(f"ratio (best / best): {best_pre / best_raw:.3f}; median of the rounds' ratios: "
          f"{float(np.median(ratios)):.3f}")
    total = raw_tokens * args.rounds
    print(f"tokens per CPU-second: raw {total / cpu_raw / 1e6:.2f}M, preprocess "
          f"{total / cpu_pre / 1e6:.2f}M, ratio {cpu_raw / cpu_pre:.3f}")


if __name__ == "__main__":
    main()
