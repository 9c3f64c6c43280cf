"""tools/train_tokenizer.py: a sentencepiece BPE model with the project's fixed special ids."""

import gzip
import os
import subprocess
import sys

import pytest
import sentencepiece

from megatron_ntp.data.train_tokenizer import train_sentencepiece

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_tool_trains_a_model(corpus, tmp_path):
    run = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "train_tokenizer.py"), "--input", corpus,
         "--model-prefix", str(tmp_path / "tok"), "--vocab-size", "600", "--sample-size", "20000",
         "--special-tokens", "<|im_start|>", "<|im_end|>"],
        capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    model = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "tok.model"))
    assert model.get_piece_size() == 600
    assert (model.pad_id(), model.unk_id(), model.bos_id(), model.eos_id()) == (0, 1, 2, 3)
    assert [model.piece_to_id(t) for t in ("<|im_start|>", "<|im_end|>")] == [4, 5]
    assert model.encode("<|im_end|>")[-1] == 5  # kept whole
    # Byte fallback: text outside the training alphabet has no unknown pieces.
    assert model.unk_id() not in model.encode("日本語 ✓ ∮")


def test_same_seed_same_model_and_gzip_input(corpus, tmp_path):
    with open(corpus, "rb") as src, gzip.open(tmp_path / "c.jsonl.gz", "wb") as dst:
        dst.write(src.read())
    a = train_sentencepiece([corpus], str(tmp_path / "a"), vocab_size=500, sample_size=20000)
    b = train_sentencepiece([str(tmp_path / "c.jsonl.gz")], str(tmp_path / "b"), vocab_size=500,
                            sample_size=20000)
    pieces = []
    for path in (a, b):
        model = sentencepiece.SentencePieceProcessor(model_file=path)
        pieces.append([model.id_to_piece(i) for i in range(model.get_piece_size())])
    assert pieces[0] == pieces[1]


def test_errors(corpus, tmp_path):
    with pytest.raises(ValueError, match="too small"):
        train_sentencepiece([corpus], str(tmp_path / "m"), vocab_size=4)
    with pytest.raises(FileNotFoundError, match="no such file"):
        train_sentencepiece([str(tmp_path / "none.jsonl")], str(tmp_path / "m"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train_sentencepiece([corpus], str(tmp_path / "missing" / "m"))
    with pytest.raises(ValueError, match="without whitespace"):
        train_sentencepiece([corpus], str(tmp_path / "m"), special_tokens=["a b"])
