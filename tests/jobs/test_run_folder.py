"""A run folder's records in one step numbering: steps 1..train.steps (optimizer steps complete),
and folders written before that numbering (metrics.jsonl from step 0) read and resumed in it."""

import json

import pytest

from megatron_ntp.jobs.run_folder import (
    is_complete,
    last_step,
    mark_complete,
    numbered_from_zero,
    read_metrics,
    renumber_from_zero,
    truncate_records,
)


def _write(path, steps, **fields):
    path.write_text("".join(json.dumps({"step": s, **fields}) + "\n" for s in steps))


def _steps(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_a_resume_from_iter_n_drops_the_records_after_step_n_and_a_cut_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')  # killed mid-line
    assert truncate_records(str(path), 2) == 2  # iter_0000002: steps 1 and 2 are done
    assert _steps(path) == [1, 2]
    assert truncate_records(str(path), 0) == 2  # from scratch: nothing is kept
    assert path.read_text() == ""
    assert truncate_records(str(tmp_path / "absent.jsonl"), 0) == 0


def test_a_folder_numbered_from_zero_is_read_in_todays_numbering(tmp_path):
    _write(tmp_path / "metrics.jsonl", range(4), ce=1.0)  # 4 steps, logged as 0..3
    _write(tmp_path / "valid.jsonl", [1, 3], ce=2.0)  # validations after steps 2 and 4
    assert numbered_from_zero(str(tmp_path))
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, 3, 4]
    assert [r["step"] for r in read_metrics(str(tmp_path), "valid.jsonl")] == [2, 4]
    assert last_step(str(tmp_path)) == 4
    mark_complete(str(tmp_path), steps=4)
    assert is_complete(str(tmp_path))


def test_todays_folders_are_left_as_they_are(tmp_path):
    assert not numbered_from_zero(str(tmp_path)) and last_step(str(tmp_path)) == 0
    assert read_metrics(str(tmp_path), missing_ok=True) == []
    with pytest.raises(FileNotFoundError, match="metrics.jsonl: no metrics"):
        read_metrics(str(tmp_path))
    _write(tmp_path / "metrics.jsonl", range(1, 5))
    _write(tmp_path / "valid.jsonl", [2, 4])
    assert not numbered_from_zero(str(tmp_path)) and not renumber_from_zero(str(tmp_path))
    assert [r["step"] for r in read_metrics(str(tmp_path), "valid.jsonl")] == [2, 4]
    assert _steps(tmp_path / "metrics.jsonl") == [1, 2, 3, 4]
    with pytest.raises(RuntimeError, match="ends at step 4, not at the last step 5"):
        mark_complete(str(tmp_path), steps=5)


def test_a_resume_renumbers_a_folder_numbered_from_zero_once(tmp_path):
    """The trainer renumbers before it truncates and appends, so that the file holds one
    numbering; a cut last line is dropped, as truncation would."""
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "ce": 5.0 - s}) + "\n" for s in range(3)) + '{"step": 3')
    _write(tmp_path / "valid.jsonl", [1])
    assert renumber_from_zero(str(tmp_path))
    assert _steps(tmp_path / "metrics.jsonl") == [1, 2, 3]
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["ce"] == 5.0
    assert _steps(tmp_path / "valid.jsonl") == [2]
    assert not renumber_from_zero(str(tmp_path))  # once: step 0 is gone
    assert _steps(tmp_path / "metrics.jsonl") == [1, 2, 3]
