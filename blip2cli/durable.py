"""Writing files and directories so that a crash at any instant leaves the old version or the new one.

The pattern everywhere: write into a temporary sibling, fsync its files and itself, then swap it into place
and fsync the parent directory (a rename is durable only once its directory is). Directories are swapped
with Linux's ``renameat2(RENAME_EXCHANGE)``, atomic at every instant: the target always exists, as the old
or the new version. Where the filesystem or OS lacks it (macOS, NFS), the old directory is renamed aside
first, and for that instant the target is missing; callers that need more (``latest``) never point at a
directory while it is being replaced.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import uuid
from pathlib import Path

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def fsync_path(path: Path) -> None:
    """Flush one file or directory to disk (directories: their entries, i.e. renames into them)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:  # some filesystems cannot fsync a directory; the data itself is flushed
        if err.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under ``root``, then every directory (deepest first)."""
    directories = []
    for folder, _, files in os.walk(root):
        directories.append(Path(folder))
        for name in files:
            fsync_path(Path(folder) / name)
    for folder in reversed(directories):
        fsync_path(folder)


def write_text_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text``: readers see the old or the new content, never a torn file."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2). False where the OS or filesystem cannot."""
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(None, use_errno=True)
        except OSError:
            _LIBC = False
    return _LIBC or None


def replace_directory(new: Path, target: Path) -> None:
    """Put the complete directory ``new`` at ``target`` (a sibling), replacing what is there, then delete
    the old version. ``new`` is fsynced first; the parent directory after the swap."""
    fsync_tree(new)
    if target.exists():
        if not _exchange(new, target):  # fallback: aside, then in (target briefly missing)
            aside = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(target, aside)
            os.rename(new, target)
            new = aside
        fsync_path(target.parent)
        shutil.rmtree(new, ignore_errors=True)  # now the old version
    else:
        os.rename(new, target)
        fsync_path(target.parent)
