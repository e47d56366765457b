"""Writing files so that a killed process never leaves half of one: the one atomic-write helper
every writer (checkpoints, caches, reports, images) shares."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


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


def as_write_error(err: BaseException, path: Path, tmp: str | Path | None = None) -> OSError | None:
    """``err``, raised while writing ``path`` (through its temporary ``tmp``), as an OSError
    naming ``path`` when it is a failed write; else None. With ``tmp``, an OSError about a
    file outside it (one the writer reads) is not one. Besides OSError: safetensors reports a failed write as a
    SafetensorError ("Error while serializing: I/O error: ... (os error 28)") and torch.save
    as a RuntimeError from its zip writer ("enforce fail at inline_container.cc ...
    unexpected pos"), neither naming the file: the command line printed them as tracebacks.
    The temporary name alone ("Permission denied: '.out.png.1ex6i460.tmp'") is not one the
    user gave either."""
    if isinstance(err, OSError):
        if tmp is not None and err.filename is not None:
            if not str(err.filename).startswith(str(tmp)):
                return None  # about another file
        if err.errno is None or err.strerror is None:
            return OSError(f"cannot write {path}: {err}")
        return type(err)(err.errno, f"cannot write {path}: {err.strerror}")
    text = str(err)
    code = re.search(r"\(os error (\d+)\)", text)
    if code is not None and "serializ" in text:
        number = int(code.group(1))
        return OSError(number, f"cannot write {path}: {os.strerror(number)}")
    if "inline_container" in text or "PytorchStreamWriter" in text:
        return OSError(
            f"cannot write {path}: the write stopped part way ({' '.join(text.split())})"
        )
    return None


@contextlib.contextmanager
def naming_write_errors(path: Path, tmp: str | Path | None = None) -> Iterator[None]:
    """Re-raise a failed write of ``path`` (through ``tmp``) inside the block as an OSError
    naming ``path`` (:func:`as_write_error`); any other error passes unchanged."""
    try:
        yield
    except Exception as err:
        wrapped = as_write_error(err, path, tmp)
        if wrapped is None:
            raise
        raise wrapped from err


def atomic_write(path: Path, write: Callable[[str], object], durable: bool = False) -> None:
    """Call ``write(tmp_path)`` for a temp file next to ``path``, then os.replace it into place
    (a crash mid-write never leaves a half-written file under the final name). ``durable``:
    fsync the file before the rename and the folder after it (caches a later run trusts)."""
    path = Path(path)
    with naming_write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with naming_write_errors(path, tmp):
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
    """Call ``write(tmp_folder)`` for a fresh folder next to ``path``, then swap it into place,
    so an interrupted write never leaves a half-written file or subfolder under ``path``.

    A missing ``path``, or one holding nothing the new folder does not (a previous save), is
    swapped whole. A folder with other entries too (the user's own files beside an export) is
    kept: each entry of the new folder is swapped in on its own and the others stay. A
    symlink is followed: the folder it names is the one written."""
    path = Path(path)
    if path.is_symlink():
        path = path.resolve()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path}: expected a folder to write into, it is a file")
    with naming_write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    public_mode(tmp, directory=True)  # mkdtemp's 0700 would stay on the renamed folder
    try:
        with naming_write_errors(path, tmp):
            write(tmp)
            if not path.exists():
                os.replace(tmp, path)
                return
            new = {p.name for p in tmp.iterdir()}
            if {p.name for p in path.iterdir()} - new:
                swap_in([(tmp / name, path / name) for name in sorted(new)])
                tmp.rmdir()
            else:
                swap_in([(tmp, path)])
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def swap_in(pairs: Sequence[tuple[Path, Path]]) -> None:
    """Rename each ``new`` to its ``final``, all or none. An existing ``final`` is moved aside
    first (a folder cannot be replaced by a rename) and deleted only once every rename is done;
    if one fails, those done are undone and the old ``final`` s put back (a failed second
    rename used to leave the target missing, its old copy in a hidden folder)."""
    done: list[tuple[Path, Path, Path | None]] = []  # (new, final, folder holding the old final)
    try:
        for new, final in pairs:
            aside = None
            if final.exists() or final.is_symlink():
                aside = Path(
                    tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent)
                )
                os.replace(final, aside / final.name)
            done.append((new, final, aside))
            os.replace(new, final)
    except BaseException:
        for new, final, aside in reversed(done):
            with contextlib.suppress(OSError):
                if not (new.exists() or new.is_symlink()):
                    os.replace(final, new)  # the new one back where its caller cleans up
                if aside is not None:
                    os.replace(aside / final.name, final)
                    aside.rmdir()
        raise
    for _, _, aside in done:
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)


def safetensors_ready(tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``tensors`` as safetensors takes them, copying only what it would refuse: a tensor whose
    storage an earlier one already uses (tied weights, views of one buffer) and a non-contiguous
    one. Every other tensor is passed as it is: copying them all held a second full model in
    memory while the file was written."""
    import torch

    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[torch.device, int]] = set()
    for key, t in tensors:
        t = t.detach()
        where = (t.device, t.untyped_storage().data_ptr())
        if not t.is_contiguous() or (where in seen and t.numel() > 0):
            t = t.clone(memory_format=torch.contiguous_format)
        else:
            seen.add(where)
        out[key] = t
    return out


def sampled_digest(path: str | os.PathLike, samples: int = 16, chunk: int = 1 << 14) -> str:
    """A cheap content fingerprint of a file or folder: for each file (a folder's, recursively,
    in name order) its name, byte size and the SHA-256 of ``samples`` chunks spread over it
    (the first and the last included). Files rewritten at the same path with new values almost
    surely change it, without reading gigabytes of weights or embeddings; a copy to another
    machine keeps it (no mtimes)."""
    import hashlib

    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        h.update(f"{file.relative_to(root).as_posix() if file != root else ''}:{size}".encode())
        with open(file, "rb") as f:
            if size <= samples * chunk:
                h.update(f.read())
                continue
            step = (size - chunk) / (samples - 1)
            for i in range(samples):
                f.seek(int(i * step))
                h.update(f.read(chunk))
    return h.hexdigest()
