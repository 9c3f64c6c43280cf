"""The manifest of a checkpoint: every file's size and CRC-32, written at save, checked at load.

checkpoint.json holds, under "files", one entry per file of the checkpoint folder except
checkpoint.json itself (megatron-core's metadata.json, .metadata, common.pt, every rank's
*.distcp, config.yaml):

    "files": {"__0_0.distcp": {"bytes": 5242880, "crc32": "9a3c11f0"}, ...}

It is written before the folder is renamed to iter_N, so a published checkpoint always has one.
A checkpoint is damaged when checkpoint.json cannot be read, or a listed file is missing, has
another size (truncated by a partial copy or a full disk) or, when checksums are checked, other
contents. Files not in the manifest are ignored (a user's notes beside the shards).

Pure file operations; the collective parts (each rank checksumming a share of the files) are in
checkpoint.py. CRC-32 is zlib's (no dependency; its speed is measured by
benchmarks/checkpoint_bench.py).
"""

import json
import os
import re
import zlib

from megatron_ntp.config import ConfigError
from megatron_ntp.training.checkpoint_files import INFO_FILE

FORMAT_VERSION = 2  # of checkpoint.json; 2: with the manifest (1 had none)
MANIFEST_KEY = "files"
_CHUNK_BYTES = 8 << 20
_WRITER = re.compile(r"__(\d+)_\d+\.distcp$")  # torch_dist shard files: __<global rank>_<n>


class CheckpointDamaged(ConfigError):
    """A checkpoint that does not match its manifest; the message names the checkpoint, each
    damaged file and what is wrong with it."""


def damage_report(checkpoint_dir: str, problems: list[str]) -> str:
    return (f"checkpoint {checkpoint_dir} is damaged: " + "; ".join(problems)
            + " (the folder is left as it is)")


def file_checksum(path: str) -> tuple[int, str]:
    """(bytes read, CRC-32 as 8 hex digits) of a file, read in 8 MiB chunks."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return size, f"{crc:08x}"


def list_files(folder: str) -> list[str]:
    """Paths (relative to `folder`, sorted) of every file the manifest covers."""
    names = []
    for parent, _, files in os.walk(folder):
        for name in files:
            relative = os.path.relpath(os.path.join(parent, name), folder)
            if relative != INFO_FILE:
                names.append(relative)
    return sorted(names)


def share_of(names: list[str], rank: int, world_size: int) -> list[str]:
    """The files `rank` checksums: the shards it wrote (still in its page cache after a save),
    the others spread round-robin."""
    mine = []
    for index, name in enumerate(names):
        writer = _WRITER.search(name)
        owner = int(writer.group(1)) if writer else index
        if owner % world_size == rank:
            mine.append(name)
    return mine


def manifest_entries(folder: str, names: list[str]) -> dict:
    """{name: {"bytes", "crc32"}} of the named files."""
    entries = {}
    for name in names:
        size, crc = file_checksum(os.path.join(folder, name))
        entries[name] = {"bytes": size, "crc32": crc}
    return entries


def read_manifest(checkpoint_dir: str) -> tuple[dict | None, list[str]]:
    """(manifest or None, problems): None without problems for a checkpoint saved before
    manifests existed (nothing to check against)."""
    path = os.path.join(checkpoint_dir, INFO_FILE)
    try:
        with open(path) as f:
            info = json.load(f)
    except FileNotFoundError:
        return None, [f"{INFO_FILE} is missing"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return None, [f"{INFO_FILE} cannot be read ({err})"]
    if not isinstance(info, dict):
        return None, [f"{INFO_FILE} holds {type(info).__name__}, not an object"]
    manifest = info.get(MANIFEST_KEY)
    if info.get("format", 1) >= 2 and not isinstance(manifest, dict):
        return None, [f"{INFO_FILE} has no manifest ({MANIFEST_KEY!r})"]
    return manifest, []


def find_problems(checkpoint_dir: str, checksums: bool = True) -> list[str]:
    """Everything wrong with a checkpoint, read by this process alone (the checksums only when
    every size is right); [] when it is intact or has no manifest to check against."""
    manifest, problems = read_manifest(checkpoint_dir)
    if problems or manifest is None:
        return problems
    problems = size_problems(checkpoint_dir, manifest)
    if problems or not checksums:
        return problems
    return checksum_problems(checkpoint_dir, manifest, sorted(manifest))


def size_problems(checkpoint_dir: str, manifest: dict) -> list[str]:
    """Files of the manifest that are missing or have another size (one stat each)."""
    problems = []
    for name, entry in sorted(manifest.items()):
        try:
            size = os.stat(os.path.join(checkpoint_dir, name)).st_size
        except FileNotFoundError:
            problems.append(f"{name} is missing")
            continue
        if size != entry["bytes"]:
            what = "truncated" if size < entry["bytes"] else "longer than saved"
            problems.append(f"{name} is {size} bytes, the manifest says {entry['bytes']} "
                            f"({what})")
    return problems


def checksum_problems(checkpoint_dir: str, manifest: dict, names: list[str]) -> list[str]:
    """Files among `names` whose CRC-32 differs from the manifest's (contents changed)."""
    problems = []
    for name in names:
        _, crc = file_checksum(os.path.join(checkpoint_dir, name))
        if crc != manifest[name]["crc32"]:
            problems.append(f"{name} has CRC-32 {crc}, the manifest says "
                            f"{manifest[name]['crc32']} (contents changed)")
    return problems
