"""The file-system side of checkpoints: names, the tracker, publishing, pruning.

Pure file operations (no process group, no megatron-core), done by global rank 0:

    <save_dir>/latest_checkpointed_iteration.txt   the newest complete checkpoint's step
    <save_dir>/iter_0000300/                        a complete checkpoint (has checkpoint.json)
    <save_dir>/iter_0000400.tmp/                    being written, crashed, or being deleted
    <save_dir>/iter_0000200.damaged/                a damaged checkpoint, set aside (kept)

Only a folder named iter_XXXXXXX with checkpoint.json in it counts as a checkpoint. A save
writes iter_N.tmp, renames it to iter_N when complete (`publish`), then replaces the tracker
(`write_durably(..., atomic=True)`). Deleting renames to a .tmp name first, so a half-deleted
folder never looks like a checkpoint. A damaged checkpoint is never deleted: a new save of its
step renames it to iter_N.damaged (checkpoint.py decides what is damaged).
"""

import json
import os
import re
import shutil

from megatron_ntp.config import ConfigError
from megatron_ntp.files import write_atomic

TRACKER_FILE = "latest_checkpointed_iteration.txt"
CONFIG_FILE = "config.yaml"
INFO_FILE = "checkpoint.json"
TEMP_SUFFIX = ".tmp"
DAMAGED_SUFFIX = ".damaged"  # a damaged checkpoint set aside by a new save of its step
_ITERATION_DIR = re.compile(r"iter_(\d{7,})$")
_TEMPORARY_DIR = re.compile(r"iter_\d{7,}.*\.tmp$")


def iteration_dir_name(step: int) -> str:
    return f"iter_{step:07d}"


def complete_checkpoints(root: str) -> dict[int, str]:
    """{step: folder} of the complete checkpoints under `root` (temporaries are ignored)."""
    found = {}
    if os.path.isdir(root):
        for name in os.listdir(root):
            match = _ITERATION_DIR.match(name)
            path = os.path.join(root, name)
            if match and os.path.isfile(os.path.join(path, INFO_FILE)):
                found[int(match.group(1))] = path
    return found


def latest_checkpoint(root: str) -> str | None:
    """The folder the tracker names; the newest complete one if the tracker is missing or
    names a folder that is gone; None when `root` holds no checkpoint."""
    candidates, _ = resume_candidates(root)
    return candidates[0] if candidates else None


def resume_candidates(root: str) -> tuple[list[str], list[str]]:
    """(checkpoints to resume from, best first; notes on the tracker): the one the tracker
    names, then the older complete ones, newest first (later folders belong to an abandoned
    timeline); without a usable tracker every complete one, newest first. The notes say why a
    tracker was not usable."""
    complete = complete_checkpoints(root)
    tracked, notes = _read_tracker(root), []
    if isinstance(tracked, str):
        notes.append(f"{os.path.join(root, TRACKER_FILE)} holds {tracked!r}, not a step: "
                     f"ignored")
    elif tracked is not None and tracked not in complete:
        notes.append(f"{os.path.join(root, TRACKER_FILE)} names step {tracked}, but "
                     f"{iteration_dir_name(tracked)} is missing or incomplete: ignored")
    if tracked in complete:
        steps = [tracked] + sorted((s for s in complete if s < tracked), reverse=True)
    else:
        steps = sorted(complete, reverse=True)
    return [complete[step] for step in steps], notes


def resolve_checkpoint_dir(path: str) -> str:
    """`path` itself when it is a checkpoint (an iter_XXXXXXX folder), else its latest one."""
    if os.path.isfile(os.path.join(path, INFO_FILE)):
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        what = "does not exist" if not os.path.exists(path) else (
            f"holds no checkpoint (no {TRACKER_FILE} naming a complete iter_XXXXXXX folder, and "
            f"no such folder with {INFO_FILE})")
        raise ConfigError(f"checkpoint folder {path!r} {what}")
    return latest


def read_checkpoint_info(checkpoint_dir: str) -> dict:
    """checkpoint.json of a checkpoint (or of the latest one in a save_dir)."""
    with open(os.path.join(resolve_checkpoint_dir(checkpoint_dir), INFO_FILE)) as f:
        return json.load(f)


def _read_tracker(root: str) -> int | str | None:
    """The tracker's step; its text when that is not a step; None without a tracker."""
    try:
        with open(os.path.join(root, TRACKER_FILE), "rb") as f:
            text = f.read(100).decode("utf-8", errors="replace").strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else text


def remove_temporaries(root: str) -> None:
    """Delete the .tmp folders of crashed saves, replaced and pruned checkpoints."""
    for name in os.listdir(root):
        if _TEMPORARY_DIR.match(name):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def prune_checkpoints(root: str, keep_last: int, newest: int,
                      damaged=lambda path: False) -> None:
    """Keep `newest` and the keep_last - 1 checkpoints before it; delete older ones. Folders of
    later steps (left by an abandoned timeline) are not touched; nor is a checkpoint that
    `damaged(folder)` says is damaged (it is not counted among the kept ones either: it is left
    for a person to look at)."""
    older = sorted(step for step, path in complete_checkpoints(root).items()
                   if step < newest and not damaged(path))
    for step in older[:max(0, len(older) - (keep_last - 1))]:
        path = os.path.join(root, iteration_dir_name(step))
        doomed = path + ".deleted" + TEMP_SUFFIX
        os.rename(path, doomed)  # atomically no longer a checkpoint
        shutil.rmtree(doomed, ignore_errors=True)


def publish(temporary: str, final: str, keep_existing: bool = False) -> str | None:
    """Rename a finished iter_N.tmp to iter_N. An iter_N already there (an earlier attempt: a
    crash between its rename and the tracker update, or a damaged checkpoint the run fell back
    from) is replaced; with keep_existing it is renamed to iter_N.damaged[.K] instead, never
    deleted, and that name is returned."""
    set_aside = None
    if os.path.exists(final):
        if keep_existing:
            set_aside = _free_name(final + DAMAGED_SUFFIX)
            os.rename(final, set_aside)
            os.rename(temporary, final)
        else:
            replaced = final + ".replaced" + TEMP_SUFFIX
            shutil.rmtree(replaced, ignore_errors=True)
            os.rename(final, replaced)
            os.rename(temporary, final)
            shutil.rmtree(replaced, ignore_errors=True)
    else:
        os.rename(temporary, final)
    _fsync_dir(os.path.dirname(final))
    return set_aside


def _free_name(path: str) -> str:
    count, candidate = 0, path
    while os.path.exists(candidate):
        count += 1
        candidate = f"{path}.{count}"
    return candidate


def write_durably(path: str, text: str, atomic: bool = False) -> None:
    """Write and fsync; atomic: through megatron_ntp.files (a temporary file and a rename), then
    the folder fsynced so the rename itself survives a crash."""
    if atomic:
        write_atomic(path, text)
        _fsync_dir(os.path.dirname(path))
        return
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    fd = os.open(path or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

