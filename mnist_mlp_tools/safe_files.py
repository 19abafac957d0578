"""Files written whole or not at all, and paths checked for being the regular files they claim to be.

Plumbing that could serve any program that writes results: nothing here knows about MNIST.
"""

import contextlib
import os
import stat
import tempfile


def _umask():
    mask = os.umask(0o022)  # the only way to read the umask is to set it; put it straight back
    os.umask(mask)
    return mask


def atomic_write(path, write):
    """Call write(file) on a temp file beside `path`, then rename it over `path`.

    A crash at any moment leaves either the old file or the complete new one, never a half.
    The file gets the permissions a plain open() would give it (0666 less the umask).
    """
    folder = os.path.dirname(os.path.abspath(path))
    # The temp name is short whatever the final one is: a name that fits the filesystem must not be
    # refused because the hidden one beside it is longer.
    fd, temp_path = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)[:40]}.", suffix=".tmp")
    try:
        if hasattr(os, "fchmod"):  # mkstemp makes it 0600; POSIX-only, and Windows has no such modes to set
            os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_path, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temp_path)
        raise


def is_regular_file(path):
    """True for a regular file (or a link to one); False for a folder, FIFO, device or nothing."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


@contextlib.contextmanager
def folders_removed_if_left_empty(path):
    """Around work that may create the folder `path` and its parents: those it created are removed
    again if they are left empty, so a run that failed before writing anything leaves no trace."""
    missing, folder = [], os.path.abspath(path)
    while not os.path.exists(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    try:
        yield
    finally:
        for folder in missing:  # the deepest first
            with contextlib.suppress(OSError):
                os.rmdir(folder)
