"""Writing a file so that a reader sees the old content or the new one, never half of it.

Every output file of the project that another process (or a rerun) may read goes through here:
the content is written to a temporary file in the same folder (so the rename stays on one file
system), flushed and fsynced, then renamed over the target. On any error, Ctrl-C included, the
temporary file is removed and the target is left as it was.
"""

import contextlib
import os
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
