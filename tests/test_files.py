"""megatron_ntp.files: atomic writes leave the target whole or untouched, with the mode a plain
open() would give it (the umask applied; an existing file's mode kept)."""

import contextlib
import os
import stat

import pytest

from megatron_ntp.files import atomic_path, current_umask, write_atomic


@contextlib.contextmanager
def _umask(value: int):
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask, want", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)],
                         ids=["umask022", "umask002", "umask077"])
def test_new_files_get_the_mode_of_a_plain_open(tmp_path, umask, want):
    with _umask(umask):
        assert current_umask() == umask
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
        write_atomic(str(tmp_path / "latest_checkpointed_iteration.txt"), "100")
        with atomic_path(str(tmp_path / "curves.png"), suffix=".png") as temporary:
            os.remove(temporary)  # a writer that creates its file anew (as savefig may)
            with open(temporary, "wb") as f:
                f.write(b"png")
    assert _mode(tmp_path / "plain.txt") == want
    assert _mode(tmp_path / "latest_checkpointed_iteration.txt") == want
    assert _mode(tmp_path / "curves.png") == want
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "100"
    assert sorted(os.listdir(tmp_path)) == ["curves.png", "latest_checkpointed_iteration.txt",
                                            "plain.txt"]  # no temporaries left


def test_an_existing_file_keeps_its_mode(tmp_path):
    target = tmp_path / "summary.json"
    target.write_text("old")
    os.chmod(target, 0o640)
    with _umask(0o022):
        write_atomic(str(target), "new")
    assert _mode(target) == 0o640 and target.read_text() == "new"


def test_a_failed_write_leaves_the_target_and_no_temporary(tmp_path):
    target = tmp_path / "summary.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="writer failed"):
        with atomic_path(str(target)) as temporary:
            with open(temporary, "w") as f:
                f.write("half")
            raise RuntimeError("writer failed")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["summary.json"]
