"""Writing files so that a killed process never leaves half of one: the one atomic-write helper
every writer (checkpoints, caches, reports, images) shares."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def fsync_path(path: Path) -> None:
    """fsync a file or directory; a directory fsync makes a rename inside it durable. Some
    platforms / filesystems cannot fsync directories: then this is a no-op."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def umask() -> int:
    """The process's umask (read by setting it, then putting it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def public_mode(path: str | os.PathLike, directory: bool = False) -> None:
    """Give a file / folder made by mkstemp / mkdtemp (private: 0600 / 0700) the mode a plain
    new one gets under the umask, before it is renamed into place."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


def atomic_write(path: Path, write: Callable[[str], None], durable: bool = False) -> None:
    """Call ``write(tmp_path)`` for a temp file next to ``path``, then os.replace it into place
    (a crash mid-write never leaves a half-written file under the final name). ``durable``:
    fsync the file before the rename and the folder after it (caches a later run trusts)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        public_mode(tmp)
        if durable:
            fsync_path(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if durable:
        fsync_path(path.parent)


def atomic_folder(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_folder)`` for a fresh folder next to ``path``, then swap it into place:
    an interrupted write leaves the old folder (or none), never a half-written one under the
    final name. An existing ``path`` is moved aside first and deleted after the swap."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    public_mode(tmp, directory=True)  # mkdtemp's 0700 would stay on the renamed folder
    try:
        write(tmp)
        if path.exists() or path.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
