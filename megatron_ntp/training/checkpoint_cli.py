"""`megatron-ntp checkpoint verify DIR`: each checkpoint of a save_dir and its state.

One process, no megatron-core: the files are checked against each checkpoint's manifest
(checkpoint_manifest.py), as a run does before loading. Exit status 0 when every checkpoint is
intact, 1 when one is damaged, 2 when DIR holds none.
"""

import os
import re

from megatron_ntp.config import ConfigError
from megatron_ntp.training.checkpoint_files import (
    DAMAGED_SUFFIX,
    INFO_FILE,
    TEMP_SUFFIX,
    resume_candidates,
)
from megatron_ntp.training.checkpoint_manifest import find_problems, read_manifest

_LISTED = re.compile(r"iter_(\d{7,})(\..*)?$")  # checkpoints, temporaries, set-aside ones


def add_commands(commands) -> None:
    checkpoint = commands.add_parser(
        "checkpoint", help="inspect checkpoints (verify)",
        description="Inspect the checkpoints of a save_dir.")
    actions = checkpoint.add_subparsers(dest="action", metavar="ACTION", required=True)
    verify = actions.add_parser(
        "verify", help="check every checkpoint in DIR against its manifest",
        description="List each iteration folder in DIR (a save_dir, or one iter_XXXXXXX "
                    "folder) with its state: intact, DAMAGED (which file, what is wrong), "
                    "incomplete (a save in progress or one that crashed) or unverifiable (no "
                    "manifest); and the checkpoint a resume would start from (for one "
                    "folder: a resume of the save_dir holding it). Exit status 0: all intact; "
                    "1: one is damaged; 2: no checkpoint.")
    verify.add_argument("dir", metavar="DIR")
    verify.add_argument("--sizes-only", action="store_true",
                        help="check presence and sizes only, not the CRC-32 of every file "
                             "(checkpoint.verify=false)")
    verify.set_defaults(run=run_verify)


def run_verify(args) -> int:
    root = args.dir.rstrip("/") or "/"
    resumed = ""  # which save_dir the resume line is about, when DIR is not one
    if os.path.isfile(os.path.join(root, INFO_FILE)):  # one checkpoint folder
        # a resume reads the save_dir around it, from whichever of its checkpoints is intact
        save_dir = os.path.dirname(os.path.abspath(root))
        folders, resumed = [root], f" of {save_dir}"
        candidates, notes = resume_candidates(save_dir)
    elif os.path.isdir(root):
        folders = [os.path.join(root, name) for name in sorted(os.listdir(root))
                   if _LISTED.match(name) and os.path.isdir(os.path.join(root, name))]
        candidates, notes = resume_candidates(root)
    else:
        raise ConfigError(f"checkpoint verify: {root!r} does not exist")
    if not folders:
        raise ConfigError(f"checkpoint verify: {root!r} holds no iter_XXXXXXX folder")
    damaged = False
    for folder in folders:
        state, problems = _state(folder, not args.sizes_only)
        damaged = damaged or bool(problems)
        print(f"{os.path.basename(folder):<24} {state}")
        for problem in problems:
            print(f"    {problem}")
    for note in notes:
        print(f"note: {note}")
    resume = next((path for path in candidates if not find_problems(path, not args.sizes_only)),
                  None)
    print(f"a resume{resumed} starts from: "
          + (os.path.basename(resume) if resume else "nothing (no intact checkpoint)"))
    return 1 if damaged else 0


def _state(folder: str, checksums: bool) -> tuple[str, list[str]]:
    """(state in words, problems) of one iteration folder."""
    if folder.endswith(TEMP_SUFFIX):
        return "incomplete (a save in progress, one that crashed, or a deletion)", []
    if not os.path.isfile(os.path.join(folder, INFO_FILE)):
        return f"incomplete (no {INFO_FILE})", []
    aside = " (set aside)" if DAMAGED_SUFFIX in os.path.basename(folder) else ""
    problems = find_problems(folder, checksums)
    if problems:
        return "DAMAGED" + aside, problems
    manifest, _ = read_manifest(folder)
    if manifest is None:
        return "unverifiable (no manifest: saved before manifests were written)" + aside, []
    size = sum(entry["bytes"] for entry in manifest.values())
    checked = "sizes" if not checksums else "sizes and CRC-32"
    return (f"intact{aside}: {len(manifest)} files, {size / 2**20:.1f} MiB ({checked} "
            f"checked)"), []
