"""Durability helper shared by the cache and checkpoint writers."""

from __future__ import annotations

import os
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
