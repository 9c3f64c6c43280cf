"""`megatron-ntp checkpoint verify` on synthetic checkpoints (a shard and a manifest each, no
training): the state of each folder and the checkpoint a resume would start from."""

import json

import pytest

from megatron_ntp.cli import main
from megatron_ntp.training.checkpoint_manifest import FORMAT_VERSION, manifest_entries


def _checkpoint(save_dir, step: int):
    folder = save_dir / f"iter_{step:07d}"
    folder.mkdir(parents=True)
    (folder / "__0_0.distcp").write_bytes(bytes(range(256)) * 4)
    info = {"format": FORMAT_VERSION, "step": step,
            "files": manifest_entries(str(folder), ["__0_0.distcp"])}
    (folder / "checkpoint.json").write_text(json.dumps(info))
    return folder


@pytest.fixture
def damaged_latest(tmp_path):
    """A save_dir with intact iter_0000050 and a truncated iter_0000100, the tracker at 100."""
    save_dir = tmp_path / "ckpt"
    _checkpoint(save_dir, 50)
    latest = _checkpoint(save_dir, 100)
    (latest / "__0_0.distcp").write_bytes(b"x" * 100)
    (save_dir / "latest_checkpointed_iteration.txt").write_text("100\n")
    return save_dir


def _verify(capsys, path) -> tuple[int, list[str]]:
    code = main(["checkpoint", "verify", str(path)])
    return code, capsys.readouterr().out.splitlines()


def test_verify_of_a_damaged_folder_names_the_checkpoint_a_resume_starts_from(
        damaged_latest, capsys):
    code, lines = _verify(capsys, damaged_latest / "iter_0000100")
    assert code == 1
    assert lines[0] == f"{'iter_0000100':<24} DAMAGED"
    assert lines[1] == "    __0_0.distcp is 100 bytes, the manifest says 1024 (truncated)"
    assert lines[-1] == f"a resume of {damaged_latest} starts from: iter_0000050"


def test_verify_of_the_save_dir_and_of_an_intact_folder(damaged_latest, capsys):
    code, lines = _verify(capsys, damaged_latest)
    assert code == 1 and lines[0].startswith(f"{'iter_0000050':<24} intact: 1 files")
    assert lines[-1] == "a resume starts from: iter_0000050"
    code, lines = _verify(capsys, damaged_latest / "iter_0000050")
    assert code == 0 and len(lines) == 2
    assert lines[-1] == f"a resume of {damaged_latest} starts from: iter_0000050"


def test_verify_of_a_folder_whose_save_dir_has_nothing_intact(tmp_path, capsys):
    _checkpoint(tmp_path / "ckpt", 100)
    (tmp_path / "ckpt" / "iter_0000100" / "__0_0.distcp").unlink()
    code, lines = _verify(capsys, tmp_path / "ckpt" / "iter_0000100")
    assert code == 1 and lines[1] == "    __0_0.distcp is missing"
    assert lines[-1] == (f"a resume of {tmp_path / 'ckpt'} starts from: nothing (no intact "
                         f"checkpoint)")
