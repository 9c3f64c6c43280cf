"""Training data: the datasets of the config's blend, or an offline sample dataset by default.

With data.blend unset, the built-in sample is used: the standard-library docstring corpus
(megatron_ntp.data.sample_corpus), a sentencepiece BPE tokenizer trained on it and the corpus
preprocessed to megatron-core's indexed format, all written once into a folder (default
`sample_data/` under the run folder's parent, or $MEGATRON_NTP_SAMPLE_DIR) and reused. This glue
lives here rather than in megatron_ntp.data because it is the training program's default,
composed from the data package's public functions.

Batches: step t of training uses global samples [t * G, (t + 1) * G) of the train dataset
(G = sequences per global batch); data-parallel rank r takes the r-th contiguous slice, cut into
micro-batches. So the global batch of a step is the same for any data-parallel size, which is
what makes losses comparable across layouts.
"""

import os

import torch
import torch.distributed as dist

from megatron_ntp.config import ConfigError
from megatron_ntp.session import is_rank0, local_device

SAMPLE_CORPUS_BYTES = 4_000_000
SAMPLE_VOCAB_SIZE = 8000  # fits the tiny presets' 8192-entry vocabulary
SAMPLE_READY = "READY"


def sample_data_dir(config) -> str:
    """Where the built-in sample dataset lives (shared by runs under one parent folder)."""
    default = os.path.join(os.path.dirname(os.path.abspath(config.logging.run_dir)),
                           "sample_data")
    return os.environ.get("MEGATRON_NTP_SAMPLE_DIR", default)


def ensure_sample_dataset(folder: str, vocab_size: int = SAMPLE_VOCAB_SIZE,
                          corpus_bytes: int = SAMPLE_CORPUS_BYTES) -> tuple[str, str]:
    """(dataset prefix, tokenizer model) of the offline sample, building it once in `folder`.

    Call on one rank (or without a process group); a READY file marks a complete build, so an
    interrupted build is redone rather than half-used.
    """
    prefix = os.path.join(folder, f"sample_spm{vocab_size}")
    model = prefix + ".model"
    dataset = prefix + "_text_document"
    if os.path.isfile(os.path.join(folder, SAMPLE_READY)):
        return dataset, model
    from megatron_ntp.data.preprocess import PreprocessOptions, preprocess
    from megatron_ntp.data.sample_corpus import write_sample_corpus
    from megatron_ntp.data.train_tokenizer import train_sentencepiece

    os.makedirs(folder, exist_ok=True)
    corpus = os.path.join(folder, "corpus.jsonl")
    write_sample_corpus(corpus, max_bytes=corpus_bytes)
    train_sentencepiece([corpus], prefix, vocab_size=vocab_size, sample_size=200_000)
    with open(os.devnull, "w") as quiet:
        summary = preprocess(PreprocessOptions(
            inputs=[corpus], output_prefix=prefix, tokenizer_type="SentencePieceTokenizer",
            tokenizer_model=model, append_eod=True, workers=1, log_interval=0), stream=quiet)
    if summary.status != "ok":
        raise RuntimeError(f"building the sample dataset in {folder} failed: {summary.error}")
    with open(os.path.join(folder, SAMPLE_READY), "w") as f:
        f.write("ok\n")
    return dataset, model


def resolve_data_config(config):
    """config.data with blend and tokenizer filled in: the sample dataset when blend is unset.

    Inside a process group global rank 0 builds the sample and the others wait at a barrier.
    """
    import dataclasses

    data = config.data
    if data.blend is not None:
        return data
    if data.tokenizer_model is not None:
        raise ValueError(f"data.tokenizer_model={data.tokenizer_model!r} is set but data.blend "
                         f"is not: name the dataset prefix tokenized with it")
    folder = sample_data_dir(config)
    if is_rank0():
        prefix, model = ensure_sample_dataset(folder)
    if dist.is_initialized():
        dist.barrier()
        prefix, model = ensure_sample_dataset(folder)  # READY exists now: only the paths
    return dataclasses.replace(data, blend=prefix, tokenizer_model=model,
                               tokenizer_type="SentencePieceTokenizer",
                               cache_dir=data.cache_dir or os.path.join(folder, "cache"))


def build_train_valid(config, global_batch_sequences: int, train_samples: int | None = None):
    """(train, valid, tokenizer) for a validated config; valid is None without validation.
    train_samples: samples the train split must hold (default train.steps global batches)."""
    try:
        return _build_train_valid(config, global_batch_sequences, train_samples)
    except (ValueError, FileNotFoundError) as err:
        # the data package names the field (data.blend, data.tokenizer_model, ...): report it
        # as a config error (exit status 2, no traceback) like the other config problems
        message = str(err)
        raise ConfigError(message if "data." in message else f"data: {message}") from err


def _build_train_valid(config, global_batch_sequences: int, train_samples: int | None):
    from megatron_ntp.data import build_datasets, build_tokenizer_from_config

    data = resolve_data_config(config)
    tokenizer = build_tokenizer_from_config(data)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ValueError(f"model.vocab_size={config.model.vocab_size} is smaller than the "
                         f"tokenizer's vocabulary ({tokenizer.vocab_size}, "
                         f"data.tokenizer_model={data.tokenizer_model!r})")
    t = config.train
    if train_samples is None:
        train_samples = t.steps * global_batch_sequences
    valid_samples = t.eval_steps * global_batch_sequences if t.eval_interval else 0
    train, valid, _ = build_datasets(data, tokenizer, train_samples, valid_samples, 0)
    if t.eval_interval and valid is None:
        raise ValueError(f"train.eval_interval={t.eval_interval} needs a validation split, but "
                         f"data.split={data.split!r} gives it no documents")
    return train, valid, tokenizer


def uses_attention_mask(config) -> bool:
    """Whether the model reads the dataloader's [b, 1, s, s] attention mask: local layers do;
    Transformer Engine's fused attention builds the causal mask itself and ignores it (16 MiB
    per sample at s = 4096, collated and copied to the GPU for nothing)."""
    return config.model.transformer_impl != "transformer_engine"


def micro_batches(dataset, first_sample: int, num_microbatches: int, micro_batch_size: int,
                  attention_mask: bool = True):
    """Collated micro-batches of this data-parallel rank, starting at global sample index
    `first_sample` (tokens/labels/loss_mask/position_ids [b, s], and attention_mask
    [b, 1, s, s] when `attention_mask`), on this rank's GPU when there is one."""
    device = local_device()
    for i in range(num_microbatches):
        start = first_sample + i * micro_batch_size
        samples = [dataset[j] for j in range(start, start + micro_batch_size)]
        yield {key: torch.stack([torch.as_tensor(s[key]) for s in samples]).to(
                   device, non_blocking=True)
               for key in samples[0] if attention_mask or key != "attention_mask"}


def rank_first_sample(step: int, global_batch_sequences: int, dp_rank: int, dp_size: int) -> int:
    """Global index of the first sample of `step` on data-parallel rank `dp_rank`."""
    return step * global_batch_sequences + dp_rank * (global_batch_sequences // dp_size)
