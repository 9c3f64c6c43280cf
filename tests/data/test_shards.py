"""Sharded preprocessing and merging: shards concatenated equal one run over all inputs."""

import json
import os

import pytest

from megatron_ntp.data.preprocess import PreprocessOptions, main, output_paths, preprocess
from megatron_ntp.data.shards import (
    merge_main,
    merge_shards,
    preprocess_shard,
    shard_files,
    shard_prefix,
)
from tests.data.helpers import file_bytes, read_documents


@pytest.fixture(scope="module")
def five_files(corpus, tmp_path_factory):
    """The corpus cut into 5 JSONL files of uneven sizes, plus a bad line in one of them."""
    folder = tmp_path_factory.mktemp("parts")
    with open(corpus, "rb") as f:
        lines = f.readlines()[:400]
    cuts = [0, 30, 150, 190, 330, 400]
    for i in range(5):
        extra = b'{"text": ""}\n' if i == 2 else b""
        (folder / f"part{i}.jsonl").write_bytes(b"".join(lines[cuts[i]:cuts[i + 1]]) + extra)
    return folder


def _options(inputs, prefix, model, keys=("text",)):
    return PreprocessOptions(inputs=inputs, output_prefix=str(prefix),
                             tokenizer_type="sentencepiece", tokenizer_model=model,
                             json_keys=list(keys), append_eod=True, log_interval=0)


def test_shard_files_are_contiguous_balanced_and_cover_the_inputs(tmp_path):
    paths = []
    for i, size in enumerate((100, 5000, 10, 10, 3000, 2000, 10)):
        paths.append(str(tmp_path / f"f{i}"))
        (tmp_path / f"f{i}").write_bytes(b"x" * size)
    for k in (1, 2, 3, 7):
        shards = [shard_files(paths, k, i) for i in range(k)]
        assert [p for s in shards for p in s] == paths and all(shards)
    assert shard_files(paths, 2, 0) == paths[:2]  # ~5100 of 10130 bytes
    with pytest.raises(ValueError, match="--num-shards 8 is more than the 7 input files"):
        shard_files(paths, 8, 0)
    with pytest.raises(ValueError, match=r"--shard-index 3 must be in \[0, --num-shards 3\)"):
        shard_files(paths, 3, 3)


def test_merged_shards_equal_one_run_and_resume(five_files, spm_model, tmp_path):
    pattern = [str(five_files / "*.jsonl")]
    whole = preprocess(_options(pattern, tmp_path / "whole", spm_model))
    prefix = tmp_path / "sharded"
    for i in range(3):
        saved, before = preprocess_shard(_options(pattern, prefix, spm_model), 3, i)
        assert saved["status"] == "ok" and not before
    # a finished shard is recognised by its summary and not redone
    mtime = os.path.getmtime(output_paths(shard_prefix(str(prefix), 1), "text")["bin"])
    saved, before = preprocess_shard(_options(pattern, prefix, spm_model), 3, 1)
    assert before and saved["documents"] > 0
    assert os.path.getmtime(output_paths(shard_prefix(str(prefix), 1), "text")["bin"]) == mtime
    total = merge_shards(str(prefix), 3)
    merged, single = output_paths(str(prefix), "text"), output_paths(str(tmp_path / "whole"),
                                                                     "text")
    assert file_bytes(merged["bin"], merged["idx"]) == file_bytes(single["bin"], single["idx"])
    on_disk = json.loads(open(f"{prefix}_preprocess_summary.json").read())
    assert on_disk == total
    for field in ("documents", "lines", "tokens", "bad_lines", "inputs"):
        assert total[field] == getattr(whole, field), field
    assert len(total["shards"]) == 3 and total["bad_lines"] == {"empty_document": 1}


def test_merge_reports_unfinished_shards_and_options_mismatch(five_files, spm_model, tmp_path):
    pattern = [str(five_files / "*.jsonl")]
    prefix = tmp_path / "p"
    preprocess_shard(_options(pattern, prefix, spm_model), 3, 0)
    with pytest.raises(ValueError, match=r"no summary for shard\(s\) \[1, 2\].*rerun the array"):
        merge_shards(str(prefix), 3)
    # a shard rerun with other options is redone, not taken from the old summary
    other = _options(pattern, prefix, spm_model)
    other.append_eod = False
    saved, before = preprocess_shard(other, 3, 0)
    assert not before and saved["append_eod"] is False
    preprocess_shard(_options(pattern, prefix, spm_model), 3, 1)
    preprocess_shard(_options(pattern, prefix, spm_model), 3, 2)
    with pytest.raises(ValueError, match="the shards of .* differ in append_eod"):
        merge_shards(str(prefix), 3)


def test_merge_cli_folder_and_prefixes(five_files, spm_model, tmp_path):
    """--input FOLDER merges every pair in name order (Megatron-LM), --input PREFIX... in the
    order given; both equal one run over the files in that order."""
    parts = tmp_path / "parts"
    parts.mkdir()
    files = sorted(str(p) for p in five_files.glob("*.jsonl"))
    for i, path in enumerate(files[:3]):
        preprocess(_options([path], parts / f"p{i}", spm_model))
    os.unlink(parts / "p0_preprocess_summary.json")  # not a dataset: ignored either way
    preprocess(_options(files[:3], tmp_path / "one", spm_model))
    one = output_paths(str(tmp_path / "one"), "text")
    assert merge_main(["--input", str(parts), "--output-prefix", str(tmp_path / "m1")]) == 0
    assert file_bytes(tmp_path / "m1.bin", tmp_path / "m1.idx") == file_bytes(one["bin"],
                                                                              one["idx"])
    prefixes = [str(parts / f"p{i}_text_document") for i in (2, 0, 1)]
    assert merge_main(["--input", *prefixes, "--output-prefix", str(tmp_path / "m2")]) == 0
    _, documents = read_documents(str(tmp_path / "m2"))
    _, first = read_documents(prefixes[0])
    assert documents[:len(first)] == first
    assert merge_main(["--input", str(tmp_path / "nope_text_document"),
                       "--output-prefix", str(tmp_path / "m3")]) == 1
    assert not os.path.exists(tmp_path / "m3.bin")


def test_preprocess_cli_shard(five_files, spm_model, tmp_path, capsys):
    args = ["--input", str(five_files / "*.jsonl"), "--output-prefix", str(tmp_path / "c"),
            "--tokenizer-type", "sentencepiece", "--tokenizer-model", spm_model,
            "--workers", "1", "--num-shards", "2"]
    assert main(args) == 1
    assert "--num-shards 2 needs --shard-index" in capsys.readouterr().err
    assert main(args + ["--shard-index", "1"]) == 0
    assert main(args + ["--shard-index", "1"]) == 0
    assert "was finished before" in capsys.readouterr().err
