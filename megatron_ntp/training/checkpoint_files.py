"""The file-system side of checkpoints: names, the tracker, publishing, pruning.

Pure file operations (no process group, no megatron-core), done by global rank 0:

    <save_dir>/latest_checkpointed_iteration.txt   the newest complete checkpoint's step
    <save_dir>/iter_0000300/                        a complete checkpoint (has checkpoint.json)
    <save_dir>/iter_0000400.tmp/                    being written, crashed, or being deleted

Only a folder named iter_XXXXXXX with checkpoint.json in it counts as a checkpoint. A save
writes iter_N.tmp, renames it to iter_N when complete (`publish`), then replaces the tracker
(`write_durably(..., atomic=True)`). Deleting renames to a .tmp name first, so a half-deleted
folder never looks like a checkpoint.
"""

import json
import os
import re
import shutil

from megatron_ntp.config import ConfigError

TRACKER_FILE = "latest_checkpointed_iteration.txt"
CONFIG_FILE = "config.yaml"
INFO_FILE = "checkpoint.json"
TEMP_SUFFIX = ".tmp"
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
    complete = complete_checkpoints(root)
    tracked = _read_tracker(root)
    if tracked in complete:
        return complete[tracked]
    return complete[max(complete)] if complete else None


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



def _read_tracker(root: str) -> int | None:
    try:
        with open(os.path.join(root, TRACKER_FILE)) as f:
            return int(f.read().strip())
    except (FileNotFoundError, ValueError):
        return None



def remove_temporaries(root: str) -> None:
    """Delete the .tmp folders of crashed saves, replaced and pruned checkpoints."""
    for name in os.listdir(root):
        if _TEMPORARY_DIR.match(name):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def prune_checkpoints(root: str, keep_last: int, newest: int) -> None:
    """Keep `newest` and the keep_last - 1 checkpoints before it; delete older ones. Folders of
    later steps (left by an abandoned timeline) are not touched."""
    older = sorted(step for step in complete_checkpoints(root) if step < newest)
    for step in older[:max(0, len(older) - (keep_last - 1))]:
        path = os.path.join(root, iteration_dir_name(step))
        doomed = path + ".deleted" + TEMP_SUFFIX
        os.rename(path, doomed)  # atomically no longer a checkpoint
        shutil.rmtree(doomed, ignore_errors=True)


def publish(temporary: str, final: str) -> None:
    """Rename a finished iter_N.tmp to iter_N (replacing an iter_N left by an earlier try)."""
    if os.path.exists(final):
        # iter_N of an earlier attempt (a crash between its rename and the tracker update)
        replaced = final + ".replaced" + TEMP_SUFFIX
        shutil.rmtree(replaced, ignore_errors=True)
        os.rename(final, replaced)
        os.rename(temporary, final)
        shutil.rmtree(replaced, ignore_errors=True)
    else:
        os.rename(temporary, final)
    _fsync_dir(os.path.dirname(final))


def write_durably(path: str, text: str, atomic: bool = False) -> None:
    """Write and fsync; atomic: through a temporary file and os.replace."""
    target = path + ".writing" if atomic else path
    with open(target, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    if atomic:
        os.replace(target, path)
        _fsync_dir(os.path.dirname(path))


def _fsync_dir(path: str) -> None:
    fd = os.open(path or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

