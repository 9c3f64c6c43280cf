"""build_datasets: blends, splits and index caches through megatron-core, with and without gloo."""

import os
import re
import socket

import numpy as np
import pytest
import torch

from megatron_ntp.data.config import DataConfig
from megatron_ntp.data.datasets import build_datasets, build_tokenizer_from_config
from megatron_ntp.data.preprocess import PreprocessOptions, preprocess

SEQ = 32
SIZES = (200, 20, 10)  # train, valid, test samples


@pytest.fixture(scope="session")
def two_prefixes(corpus, spm_model, data_dir):
    """The corpus cut in two (300 and the rest) and preprocessed as two datasets, EOD appended."""
    with open(corpus, "rb") as f:
        lines = f.readlines()
    prefixes = []
    for name, part in (("a", lines[:300]), ("b", lines[300:])):
        (data_dir / f"{name}.jsonl").write_bytes(b"".join(part))
        preprocess(PreprocessOptions([str(data_dir / f"{name}.jsonl")], str(data_dir / name),
                                     "sentencepiece", spm_model, append_eod=True, log_interval=0))
        prefixes.append(str(data_dir / f"{name}_text_document"))
    return prefixes


def config(prefixes, cache_dir, spm_model, **kwargs):
    kwargs.setdefault("blend", f"0.3 {prefixes[0]} 0.7 {prefixes[1]}")
    return DataConfig(split="90,8,2", seq_length=SEQ, seed=7, cache_dir=str(cache_dir),
                      tokenizer_type="sentencepiece", tokenizer_model=spm_model, **kwargs)


def first_tokens(dataset, count=8):
    return np.stack([dataset[i]["tokens"].numpy() for i in range(count)])


def test_blend_splits_and_cache(two_prefixes, spm_model, spm_tokenizer, tmp_path):
    cfg = config(two_prefixes, tmp_path / "cache", spm_model, eod_mask_loss=True)
    train, valid, test = build_datasets(cfg, spm_tokenizer, *SIZES)
    assert (len(train), len(valid), len(test)) == SIZES
    # The blend draws from the two prefixes in proportion to the weights.
    fractions = np.bincount(train.dataset_index, minlength=2) / len(train)
    assert np.allclose(fractions, [0.3, 0.7], atol=0.01)
    assert [d.dataset_path for d in train.datasets] == two_prefixes
    sample = train[0]
    assert sample["tokens"].shape == sample["labels"].shape == sample["loss_mask"].shape == (SEQ,)
    assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])
    eod = spm_tokenizer.eod
    # eod_mask_loss: no loss where the input token is EOD (megatron-core's definition).
    tokens = torch.stack([train[i]["tokens"] for i in range(50)])
    masks = torch.stack([train[i]["loss_mask"] for i in range(50)])
    assert (tokens == eod).any() and (masks[tokens == eod] == 0).all()
    assert (masks[tokens != eod] == 1).all()
    # Index caches land in cache_dir, and a second build reads them back: same samples.
    cached = os.listdir(tmp_path / "cache")
    assert any("GPTDataset-train-shuffle_index.npy" in n for n in cached)
    assert any("BlendedDataset-train-dataset_index.npy" in n for n in cached)
    train2, valid2, _ = build_datasets(cfg, spm_tokenizer, *SIZES)
    assert np.array_equal(first_tokens(train), first_tokens(train2))
    assert np.array_equal(first_tokens(valid), first_tokens(valid2))


def test_seed_changes_order_and_splits_are_disjoint(two_prefixes, spm_model, spm_tokenizer,
                                                    tmp_path):
    cfg = config(two_prefixes, tmp_path / "cache", spm_model, blend=two_prefixes[1])
    train, valid, test = build_datasets(cfg, spm_tokenizer, None, None, None)
    # One prefix, no weights: plain GPTDatasets; None sizes take one epoch of each split.
    assert type(train).__name__ == "GPTDataset"
    train_docs = set(np.unique(train.document_index))
    assert train_docs.isdisjoint(np.unique(valid.document_index))
    assert train_docs.isdisjoint(np.unique(test.document_index))
    cfg.seed = 8
    reseeded, _, _ = build_datasets(cfg, spm_tokenizer, None, None, None)
    assert not np.array_equal(first_tokens(train), first_tokens(reseeded))


def test_reset_position_ids(two_prefixes, spm_model, spm_tokenizer, tmp_path):
    cfg = config(two_prefixes, tmp_path / "cache", spm_model, reset_position_ids=True,
                 reset_attention_mask=True)
    train, _, _ = build_datasets(cfg, spm_tokenizer, 50, 5, 5)
    found = False
    for i in range(50):
        sample = train[i]
        ends = (sample["tokens"][:-1] == spm_tokenizer.eod).nonzero().flatten()
        for end in ends.tolist():
            found = True
            assert sample["position_ids"][end + 1] == 0
            assert sample["attention_mask"][0, end + 1, end]  # True: masked, a new document
    assert found


def test_tokenizer_from_config(two_prefixes, spm_model, spm_tokenizer, tmp_path):
    tokenizer = build_tokenizer_from_config(config(two_prefixes, tmp_path, spm_model))
    assert tokenizer.unique_identifiers == spm_tokenizer.unique_identifiers
    assert tokenizer.tokenize("some text") == spm_tokenizer.tokenize("some text")
    with pytest.raises(ValueError, match="data.tokenizer_model is not set"):
        build_tokenizer_from_config(DataConfig())


def test_errors(two_prefixes, spm_model, spm_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="data.blend is not set"):
        build_datasets(DataConfig(), spm_tokenizer, 1, 1, 1)
    missing = str(tmp_path / "missing_text_document")
    cfg = config(two_prefixes, tmp_path, spm_model, blend=f"1 {two_prefixes[0]} 1 {missing}")
    with pytest.raises(FileNotFoundError,
                       match=f"prefix '{missing}' has no missing_text_document.idx"):
        build_datasets(cfg, spm_tokenizer, 1, 1, 1)
    with pytest.raises(ValueError, match="train_samples must be a non-negative integer"):
        build_datasets(config(two_prefixes, tmp_path, spm_model), spm_tokenizer, -1, 1, 1)


def test_blend_file_equals_inline_blend(two_prefixes, spm_model, spm_tokenizer, tmp_path):
    """A blend file (Megatron-LM's --data-args-path: the words over lines, "#" comments) builds
    the same datasets as the inline blend; a missing prefix is named with its file line."""
    blend_file = tmp_path / "blend.txt"
    blend_file.write_text(f"# pretraining mix\n0.3 {two_prefixes[0]}  # the small part\n\n"
                          f"0.7\n{two_prefixes[1]}\n")
    inline = build_datasets(config(two_prefixes, tmp_path / "c1", spm_model), spm_tokenizer,
                            *SIZES)
    from_file = build_datasets(config(two_prefixes, tmp_path / "c2", spm_model,
                                      blend=f"file:{blend_file}"), spm_tokenizer, *SIZES)
    for a, b in zip(inline, from_file):
        assert np.array_equal(first_tokens(a), first_tokens(b))
    missing = str(tmp_path / "gone_text_document")
    blend_file.write_text(f"1 {two_prefixes[0]}\n# a comment\n1 {missing}\n")
    cfg = config(two_prefixes, tmp_path / "c3", spm_model, blend=f"file:{blend_file}")
    with pytest.raises(FileNotFoundError,
                       match=rf"^{re.escape(str(blend_file))}:3: dataset prefix '{missing}' "
                             rf"has no gone_text_document.idx"):
        build_datasets(cfg, spm_tokenizer, 1, 1, 1)


def test_per_split_blend(two_prefixes, spm_model, spm_tokenizer, tmp_path):
    """A blend per split (megatron-core's blend_per_split): each split draws only from its own
    prefixes, all of their documents; a split without a blend gets no dataset."""
    a, b = two_prefixes
    blend_file = tmp_path / "train.txt"
    blend_file.write_text(f"1 {a}\n1 {b}\n")
    cfg = config(two_prefixes, tmp_path / "cache", spm_model,
                 blend={"train": f"file:{blend_file}", "valid": b})
    assert cfg.blend_tuple() is None and cfg.blend_per_split()[2] is None
    train, valid, test = build_datasets(cfg, spm_tokenizer, 100, None, None)
    assert len(train) == 100 and test is None
    assert [d.dataset_path for d in train.datasets] == [a, b]
    assert valid.dataset_path == b and len(np.unique(valid.document_index)) == \
        len(valid.dataset)  # the whole prefix, not a split of it


def _rank_main(rank, world_size, port, prefixes, spm_model, cache_dir, out_dir):
    """One gloo rank: build the datasets (rank 0 writes the caches, rank 1 reads them)."""
    import warnings

    warnings.filterwarnings("ignore")
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                         rank=rank, world_size=world_size)
    try:
        from megatron_ntp.data.tokenizer import build_tokenizer

        tokenizer = build_tokenizer("sentencepiece", spm_model)
        cfg = config(prefixes, cache_dir, spm_model)
        train, valid, _ = build_datasets(cfg, tokenizer, *SIZES)
        # Only rank 0 needs data (as with tensor parallelism): the other gets None.
        only_first = build_datasets(cfg, tokenizer, *SIZES, is_built_on_rank=lambda: rank == 0)
        np.savez(os.path.join(out_dir, f"rank{rank}.npz"), train=first_tokens(train),
                 valid=first_tokens(valid), others_none=all(d is None for d in only_first))
    finally:
        torch.distributed.destroy_process_group()


def test_gloo_ranks_match_single_process(two_prefixes, spm_model, spm_tokenizer, tmp_path):
    cfg = config(two_prefixes, tmp_path / "cache_single", spm_model)
    train, valid, _ = build_datasets(cfg, spm_tokenizer, *SIZES)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(
        _rank_main, args=(2, port, two_prefixes, spm_model, str(tmp_path / "cache_gloo"),
                          str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        result = np.load(tmp_path / f"rank{rank}.npz")
        assert np.array_equal(result["train"], first_tokens(train))
        assert np.array_equal(result["valid"], first_tokens(valid))
        assert bool(result["others_none"]) == (rank == 1)
    assert any("GPTDataset-train" in n for n in os.listdir(tmp_path / "cache_gloo"))
