"""Writing a file so that a reader sees the old content or the new one, never half of it.

Every output file of the project that another process (or a rerun) may read goes through here:
the content is written to a temporary file in the same folder (so the rename stays on one file
system), flushed and fsynced, then renamed over the target. On any error, Ctrl-C included, the
temporary file is removed and the target is left as it was.

The file gets the mode a plain `open(path, "w")` would give it: an existing target's own mode,
a new one 0666 less the umask (0644 under umask 022, 0664 under 002, so a project group on a
shared cluster reads it as it reads the shards and checkpoints). mkstemp alone would leave 0600.
"""

import contextlib
import os
import stat
import tempfile


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = ""):
    """Yield a temporary path beside `path`; when the block ends normally, it replaces `path`.

    For writers that take a file name (matplotlib's savefig, numpy, a library's save): give
    `suffix` when the writer chooses the format by extension (e.g. ".png").
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.",
                                     suffix=suffix or ".tmp")
    os.close(fd)
    try:
        yield temporary
        with open(temporary, "rb+") as f:
            # after the writer (which may have recreated the file), before it becomes `path`
            os.fchmod(f.fileno(), plain_open_mode(path))
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def write_atomic(path: str, content: str | bytes) -> None:
    """Write `content` (text as UTF-8, or bytes) to `path` atomically."""
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as f:
            f.write(content.encode() if isinstance(content, str) else content)


def plain_open_mode(path: str) -> int:
    """The permission bits `open(path, "w")` leaves: the existing file's, else 0666 & ~umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~current_umask()


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc/self/status);
    elsewhere os.umask has to set it to read it back (briefly, for every thread)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    umask = os.umask(0o077)
    os.umask(umask)
    return umask
