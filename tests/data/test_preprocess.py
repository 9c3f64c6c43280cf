"""Preprocessing: read-back with megatron-core, determinism, bad input, failures, inputs, CLI."""

import gzip
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch

from megatron_ntp.data import preprocess as preprocess_module
from megatron_ntp.data.preprocess import (BadInputError, PreprocessOptions, main, output_paths,
                                          preprocess, summary_path)
from tests.data.helpers import file_bytes, leftover_outputs, read_documents


def options(inputs, prefix, model, **kwargs):
    kwargs.setdefault("log_interval", 0)
    return PreprocessOptions(inputs=[str(p) for p in inputs], output_prefix=str(prefix),
                             tokenizer_type="SentencePieceTokenizer", tokenizer_model=model,
                             **kwargs)


@pytest.fixture(scope="session")
def small_corpus(corpus, data_dir):
    """The first 300 documents of the corpus (enough for several 8 KB chunks)."""
    path = data_dir / "small.jsonl"
    with open(corpus, "rb") as f:
        path.write_bytes(b"".join(f.readlines()[:300]))
    return path


def test_read_back_equals_tokenizer(small_corpus, spm_model, spm_tokenizer, tmp_path):
    summary = preprocess(options([small_corpus], tmp_path / "out", spm_model, append_eod=True,
                                 chunk_bytes=8192))
    texts = [json.loads(line)["text"] for line in small_corpus.read_text().splitlines()]
    dataset, documents = read_documents(str(tmp_path / "out_text_document"))
    assert dataset.index.dtype == np.uint16  # vocabulary of 1000 fits uint16
    assert documents == [spm_tokenizer.tokenize(t) + [spm_tokenizer.eod] for t in texts]
    assert list(dataset.document_indices) == list(range(len(texts) + 1))
    assert summary.status == "ok" and summary.documents == summary.lines == len(texts)
    assert summary.tokens["text"] == sum(map(len, documents))
    on_disk = json.loads(open(summary_path(str(tmp_path / "out"))).read())
    assert on_disk["status"] == "ok" and on_disk["documents"] == len(texts)
    assert on_disk["outputs"]["text"] == output_paths(str(tmp_path / "out"), "text")


def test_bulk_writer_matches_per_document_builder(small_corpus, spm_model, spm_tokenizer,
                                                  tmp_path):
    """_Writer's bulk append writes what IndexedDatasetBuilder.add_item/end_document would."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    preprocess(options([small_corpus], tmp_path / "out", spm_model))
    builder = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    for line in small_corpus.read_text().splitlines():
        builder.add_item(torch.tensor(spm_tokenizer.tokenize(json.loads(line)["text"])))
        builder.end_document()
    builder.finalize(str(tmp_path / "ref.idx"))
    out = output_paths(str(tmp_path / "out"), "text")
    assert file_bytes(out["bin"], out["idx"]) == file_bytes(tmp_path / "ref.bin",
                                                            tmp_path / "ref.idx")


def test_output_independent_of_workers_and_chunking(small_corpus, spm_model, tmp_path):
    outputs = []
    for name, workers, chunk_bytes in (("w1", 1, 8192), ("w2", 2, 8192), ("w2big", 2, 1 << 20)):
        preprocess(options([small_corpus], tmp_path / name, spm_model, workers=workers,
                           chunk_bytes=chunk_bytes, append_eod=True))
        paths = output_paths(str(tmp_path / name), "text")
        outputs.append(file_bytes(paths["bin"], paths["idx"]))
    assert outputs[0] == outputs[1] == outputs[2]


# Each bad-input case as (line, reason); the line follows a good first line in its file.
BAD_LINES = {
    "blank_line": b"   \n",
    "invalid_utf8": b'{"text": "caf\xe9"}\n',
    "surrogate": b'{"text": "lone \\ud800 surrogate"}\n',
    "not_json": b'{"text": "unterminated\n',
    "not_object": b'["text", "a list"]\n',
    "missing_key": b'{"content": "wrong key"}\n',
    "not_string": b'{"text": null}\n',
    "empty_document": b'{"text": ""}\n',
    "whitespace_document": b'{"text": " \\n\\t "}\n',
    "zero_token_document": b'{"text": "\\u200b\\u007f"}\n',  # sentencepiece drops both
}
REASON = {"surrogate": "invalid_utf8", "whitespace_document": "empty_document",
          "zero_token_document": "empty_document"}
GOOD = b'{"text": "A good document about files."}\n'


def test_bad_lines_counted_with_locations(spm_model, tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(GOOD + b"".join(line + GOOD for line in BAD_LINES.values()))
    summary = preprocess(options([path], tmp_path / "out", spm_model, workers=2, chunk_bytes=64))
    expected = {}
    for case in BAD_LINES:
        reason = REASON.get(case, case)
        expected[reason] = expected.get(reason, 0) + 1
    assert summary.bad_lines == expected
    assert summary.documents == len(BAD_LINES) + 1
    assert summary.lines == 2 * len(BAD_LINES) + 1
    # Bad lines are lines 2, 4, 6, ... in BAD_LINES order.
    locations = {reason: [e.split(": ")[0] for e in examples]
                 for reason, examples in summary.bad_examples.items()}
    for number, case in enumerate(BAD_LINES):
        assert f"{path}:{2 * number + 2}" in locations[REASON.get(case, case)]
    assert "(key 'text')" in summary.bad_examples["missing_key"][0]
    on_disk = json.loads(open(summary_path(str(tmp_path / "out"))).read())
    assert on_disk["bad_lines"] == expected and on_disk["bad_examples"] == summary.bad_examples
    _, documents = read_documents(str(tmp_path / "out_text_document"))
    assert len(documents) == len(BAD_LINES) + 1


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_strict_stops_at_first_bad_line(case, spm_model, tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(GOOD + BAD_LINES[case] + GOOD)
    reason = REASON.get(case, case)
    with pytest.raises(BadInputError, match=rf"^{re.escape(str(path))}:2: {reason}\b"):
        preprocess(options([path], tmp_path / "out", spm_model, strict=True))
    assert leftover_outputs(tmp_path) == []
    assert json.loads(open(summary_path(str(tmp_path / "out"))).read())["status"] == "failed"


@pytest.mark.parametrize("chunk_bytes", [1 << 18, 64], ids=["one_chunk", "small_chunks"])
def test_strict_summary_records_what_was_read(spm_model, spm_tokenizer, tmp_path,
                                              chunk_bytes):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_bytes(GOOD * 5)
    second.write_bytes(GOOD * 3 + b"oops\n" + GOOD * 2)
    with pytest.raises(BadInputError, match=rf"^{re.escape(str(second))}:4: not_json"):
        preprocess(options([first, second], tmp_path / "out", spm_model, strict=True,
                           append_eod=True, chunk_bytes=chunk_bytes))
    summary = json.loads(open(summary_path(str(tmp_path / "out"))).read())
    assert summary["status"] == "failed" and "b.jsonl:4: not_json" in summary["error"]
    # stopped at line 4 of the second file: 5 + 4 lines read, the 8 good ones before it
    assert summary["lines"] == 9 and summary["documents"] == 8
    per_document = len(spm_tokenizer.tokenize(json.loads(GOOD)["text"])) + 1  # + EOD
    assert summary["tokens"] == {"text": 8 * per_document}


def test_gzip_and_glob_inputs(small_corpus, spm_model, tmp_path):
    lines = small_corpus.read_bytes().splitlines(keepends=True)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_bytes(b"".join(lines[:100]))
    with gzip.open(tmp_path / "in" / "b.jsonl.gz", "wb") as f:
        f.write(b"".join(lines[100:]))
    # Glob: matches sorted (a.jsonl, b.jsonl.gz); the result equals the uncompressed file.
    preprocess(options([tmp_path / "in" / "*.jsonl*"], tmp_path / "glob", spm_model))
    preprocess(options([small_corpus], tmp_path / "plain", spm_model))
    glob_paths = output_paths(str(tmp_path / "glob"), "text")
    plain_paths = output_paths(str(tmp_path / "plain"), "text")
    assert file_bytes(glob_paths["bin"], glob_paths["idx"]) == file_bytes(plain_paths["bin"],
                                                                          plain_paths["idx"])


def test_bad_line_in_gzip_named_by_file_and_line(spm_model, tmp_path):
    path = tmp_path / "in.jsonl.gz"
    with gzip.open(path, "wb") as f:
        f.write(GOOD * 3 + b"oops\n")
    with pytest.raises(BadInputError, match=rf"^{re.escape(str(path))}:4: not_json"):
        preprocess(options([path], tmp_path / "out", spm_model, strict=True))


def test_several_json_keys_stay_aligned(spm_model, spm_tokenizer, tmp_path):
    path = tmp_path / "in.jsonl"
    records = [{"text": "first text", "title": "First"}, {"text": "no title here"},
               {"text": "third text", "title": "Third"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = preprocess(options([path], tmp_path / "out", spm_model, json_keys=["text", "title"]))
    assert summary.bad_lines == {"missing_key": 1}
    assert "(key 'title')" in summary.bad_examples["missing_key"][0]
    for key in ("text", "title"):
        _, documents = read_documents(str(tmp_path / f"out_{key}_document"))
        assert documents == [spm_tokenizer.tokenize(records[i][key]) for i in (0, 2)]


def test_tokenizer_json_and_int32_output(corpus_texts, hf_tokenizer_json, tmp_path):
    """A vocabulary above 65,500 switches the output to int32 (megatron-core's DType rule)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from megatron_ntp.data.tokenizer import build_tokenizer

    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(70_000)}}
    big = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    big.pre_tokenizer = pre_tokenizers.Whitespace()
    big.save(str(tmp_path / "big.json"))
    path = tmp_path / "in.jsonl"
    texts = ["w1 w69999 w5", "w65600 unknown", corpus_texts[0]]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    for name, model in (("small", hf_tokenizer_json), ("big", str(tmp_path / "big.json"))):
        preprocess(PreprocessOptions([str(path)], str(tmp_path / name), "HuggingFaceTokenizer",
                                     model, append_eod=True, log_interval=0))
        tokenizer = build_tokenizer("HuggingFaceTokenizer", model)
        dataset, documents = read_documents(str(tmp_path / f"{name}_text_document"))
        assert dataset.index.dtype == (np.int32 if name == "big" else np.uint16)
        assert documents == [tokenizer.tokenize(t) + [tokenizer.eod] for t in texts]
    assert documents[0][:3] == [3, 70001, 7]


def test_empty_means_no_tokens_after_encoding(hf_tokenizer_json, tmp_path):
    """U+0085 (NEL) is whitespace to str.isspace, yet byte-level BPE encodes it to tokens: it is
    a document (as in Megatron-LM's tool). With a post-processor adding a BOS to every text, a
    text encoding to the BOS alone is still empty."""
    from tokenizers import Tokenizer, processors

    from megatron_ntp.data.tokenizer import build_tokenizer

    with_bos = Tokenizer.from_file(hf_tokenizer_json)
    with_bos.post_processor = processors.TemplateProcessing(
        single="<|pad|> $A", special_tokens=[("<|pad|>", with_bos.token_to_id("<|pad|>"))])
    with_bos.save(str(tmp_path / "bos.json"))
    path = tmp_path / "in.jsonl"
    texts = ["\u0085", "", " \u0085\t", "a word"]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    for name, model in (("plain", hf_tokenizer_json), ("bos", str(tmp_path / "bos.json"))):
        summary = preprocess(PreprocessOptions([str(path)], str(tmp_path / name),
                                               "HuggingFaceTokenizer", model, log_interval=0))
        tokenizer = build_tokenizer("HuggingFaceTokenizer", model)
        assert len(tokenizer.tokenize("\u0085")) > len(tokenizer.tokenize(""))
        assert summary.bad_lines == {"empty_document": 1}
        assert summary.bad_examples["empty_document"][0].startswith(f"{path}:2: ")
        _, documents = read_documents(str(tmp_path / f"{name}_text_document"))
        assert documents == [tokenizer.tokenize(texts[i]) for i in (0, 2, 3)]


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failure_midway_leaves_no_output(error, workers, small_corpus, spm_model, tmp_path,
                                         monkeypatch):
    calls = []
    original_add = preprocess_module._Writer.add

    def add_then_fail(self, tokens, lengths):
        calls.append(1)
        if len(calls) == 3:  # after two chunks were written to the temporary files
            raise error("stop")
        original_add(self, tokens, lengths)

    monkeypatch.setattr(preprocess_module._Writer, "add", add_then_fail)
    with pytest.raises(error):
        preprocess(options([small_corpus], tmp_path / "out", spm_model, workers=workers,
                           chunk_bytes=8192))
    assert leftover_outputs(tmp_path) == []
    summary = json.loads(open(summary_path(str(tmp_path / "out"))).read())
    assert summary["status"] == ("interrupted" if error is KeyboardInterrupt else "failed")
    assert summary["outputs"] == {} and "stop" in summary["error"]


def _die_on_third_chunk(chunk):
    """Replaces jsonl.encode_chunk in forked workers: the process vanishes, like an OOM kill."""
    from megatron_ntp.data import jsonl

    if chunk.index == 2:
        os._exit(9)
    return jsonl.encode_chunk.__wrapped__(chunk)


def test_dead_worker_fails_the_run_instead_of_hanging(small_corpus, spm_model, tmp_path,
                                                      monkeypatch):
    from megatron_ntp.data import jsonl

    _die_on_third_chunk.__wrapped__ = jsonl.encode_chunk
    monkeypatch.setattr(jsonl, "encode_chunk", _die_on_third_chunk)
    where = re.escape(str(small_corpus))
    with pytest.raises(preprocess_module.WorkerDied, match=rf"died .* {where}:\d+ on"):
        preprocess(options([small_corpus], tmp_path / "out", spm_model, workers=2,
                           chunk_bytes=8192))
    assert leftover_outputs(tmp_path) == []


def test_sigterm_unwinds_like_ctrl_c(small_corpus, spm_model, tmp_path, monkeypatch):
    """SIGTERM (Slurm's cancel) raises Interrupted in the main process: same cleanup."""
    import signal

    original_add = preprocess_module._Writer.add

    def add_then_terminate(self, tokens, lengths):
        original_add(self, tokens, lengths)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(preprocess_module._Writer, "add", add_then_terminate)
    handler_before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(preprocess_module.Interrupted):
        preprocess(options([small_corpus], tmp_path / "out", spm_model, workers=2,
                           chunk_bytes=8192))
    assert signal.getsignal(signal.SIGTERM) is handler_before  # restored
    assert leftover_outputs(tmp_path) == []
    assert json.loads(open(summary_path(str(tmp_path / "out"))).read())["status"] == "interrupted"


def test_failure_keeps_previous_output_intact(small_corpus, spm_model, tmp_path, monkeypatch):
    preprocess(options([small_corpus], tmp_path / "out", spm_model))
    paths = output_paths(str(tmp_path / "out"), "text")
    before = file_bytes(paths["bin"], paths["idx"])
    monkeypatch.setattr(preprocess_module._Writer, "finish",
                        lambda self: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        preprocess(options([small_corpus], tmp_path / "out", spm_model, append_eod=True))
    assert file_bytes(paths["bin"], paths["idx"]) == before
    assert leftover_outputs(tmp_path) == sorted(os.path.basename(p) for p in paths.values())


def test_missing_inputs_fail_before_work(spm_model, small_corpus, tmp_path):
    for inputs, message in (([tmp_path / "absent.jsonl"], "absent.jsonl'?: no such file"),
                            ([tmp_path / "*.nothing"], "matches no file"),
                            ([small_corpus, small_corpus], "named twice"),
                            ([tmp_path], "not a regular file")):
        with pytest.raises((FileNotFoundError, ValueError), match=message):
            preprocess(options(inputs, tmp_path / "out", spm_model))
    with pytest.raises(FileNotFoundError, match="nope.model"):
        preprocess(options([small_corpus], tmp_path / "out", str(tmp_path / "nope.model")))
    with pytest.raises(ValueError, match="--tokenizer-type: tokenizer type 'GPT2BPETokenizer'"):
        preprocess(PreprocessOptions([str(small_corpus)], str(tmp_path / "out"),
                                     "GPT2BPETokenizer", spm_model))
    assert os.listdir(tmp_path) == []  # not even a summary file


def test_unwritable_output_fails_before_work(spm_model, small_corpus, tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("")
    for prefix in (tmp_path / "no_such_dir" / "out", tmp_path / "a_file" / "out"):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            preprocess(options([small_corpus], prefix, spm_model))
    # A folder without write permission (checked with os.access: root would bypass chmod).
    monkeypatch.setattr(preprocess_module.os, "access", lambda path, mode: False)
    with pytest.raises(PermissionError, match="is not writable"):
        preprocess(options([small_corpus], tmp_path / "out", spm_model))
    assert sorted(os.listdir(tmp_path)) == ["a_file"]


def test_no_valid_documents_is_an_error(spm_model, tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"text": ""}\nnot json\n')
    with pytest.raises(ValueError, match="no valid documents"):
        preprocess(options([path], tmp_path / "out", spm_model))
    assert leftover_outputs(tmp_path) == []


def test_option_errors(spm_model, small_corpus, tmp_path):
    for kwargs, message in (({"workers": 0}, "--workers"), ({"json_keys": []}, "--json-keys"),
                            ({"json_keys": ["a", "a"]}, "twice"),
                            ({"log_interval": -1}, "--log-interval")):
        with pytest.raises(ValueError, match=message):
            preprocess(options([small_corpus], tmp_path / "out", spm_model, **kwargs))


def test_cli(small_corpus, spm_model, tmp_path, capsys):
    prefix = str(tmp_path / "cli")
    argv = ["--input", str(small_corpus), "--output-prefix", prefix, "--tokenizer-type",
            "SentencePieceTokenizer", "--tokenizer-model", spm_model, "--workers", "2",
            "--append-eod", "--log-interval", "100", "--chunk-bytes", "16384"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    progress = [line for line in err.splitlines() if "docs |" in line]
    assert len(progress) >= 2 and "tokens/s" in progress[0] and "ETA" in progress[0]
    assert "[preprocess] ok: 300 documents" in err
    assert os.path.exists(prefix + "_text_document.idx")
    shutil.copy(small_corpus, tmp_path / "bad.jsonl")
    with open(tmp_path / "bad.jsonl", "ab") as f:
        f.write(b"{broken\n")
    assert main(argv[:1] + [str(tmp_path / "bad.jsonl")] + argv[2:] + ["--strict"]) == 1
    assert "bad.jsonl:301: not_json" in capsys.readouterr().err


def test_ctrl_c_on_the_tool_leaves_no_output(spm_model, tmp_path):
    """SIGINT to the whole process group (what Ctrl-C does) while workers run: exit 130, and
    neither final nor temporary .bin/.idx files remain."""
    import signal
    import subprocess
    import sys
    import time

    from megatron_ntp.data.sample_corpus import write_sample_corpus

    corpus = tmp_path / "big.jsonl"
    write_sample_corpus(str(corpus), max_bytes=3_000_000)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    process = subprocess.Popen(
        [sys.executable, os.path.join(root, "tools", "preprocess_data.py"), "--input",
         str(corpus), "--output-prefix", str(tmp_path / "out"), "--tokenizer-type",
         "sentencepiece", "--tokenizer-model", spm_model, "--workers", "2",
         "--chunk-bytes", "4096"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    # Wait for the temporary .bin (created once setup is done, just before encoding starts).
    deadline = time.monotonic() + 120
    while not any(".bin.tmp" in n for n in os.listdir(tmp_path)):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.1)
    os.killpg(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert leftover_outputs(tmp_path) == []
    assert json.loads(open(summary_path(str(tmp_path / "out"))).read())["status"] == "interrupted"
