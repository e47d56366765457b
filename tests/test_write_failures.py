"""Writes that fail part way (a full disk, a file-size limit, a rename refused): the error names
the file the user asked for, the earlier version of it is still there, nothing half-written or
hidden is left."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dcgen import _files
from dcgen._files import atomic_folder, atomic_write, swap_in
from dcgen.train.checkpoint import list_checkpoints, load_latest_checkpoint, save_checkpoint


@contextlib.contextmanager
def _file_size_limit(limit: int) -> Iterator[None]:
    """Writes past ``limit`` bytes fail with EFBIG, as they do with ENOSPC on a full disk (the
    same failed write(2) inside safetensors / torch.save / Python), for this process only."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the default would kill us
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*"))


BIG = {"w": torch.arange(1 << 16, dtype=torch.float32)}  # 256 KiB: past the 64 KiB limit


@pytest.mark.parametrize("writer", ["safetensors", "torch.save", "text"])
def test_a_write_that_runs_out_of_space_names_the_file_and_keeps_the_old_one(
    tmp_path: Path, writer: str
) -> None:
    # safetensors said "Error while serializing: I/O error: File too large (os error 27)" and
    # torch.save "[enforce fail at inline_container.cc:672] . unexpected pos": no file named,
    # and neither an OSError, so the command line printed a traceback
    target = tmp_path / "out.bin"
    target.write_bytes(b"the earlier version")
    write = {
        "safetensors": lambda tmp: save_file(BIG, tmp),
        "torch.save": lambda tmp: torch.save(BIG, tmp),
        "text": lambda tmp: Path(tmp).write_text("x" * (1 << 18)),
    }[writer]
    with _file_size_limit(1 << 16), pytest.raises(OSError) as info:
        atomic_write(target, write)
    assert f"cannot write {target}: " in str(info.value), str(info.value)
    if writer != "torch.save":  # torch's writer keeps no error number
        assert info.value.errno == errno.EFBIG
    assert target.read_bytes() == b"the earlier version"
    assert _hidden(tmp_path) == []


def test_an_error_about_a_file_the_writer_reads_is_not_renamed(tmp_path: Path) -> None:
    # a missing source is not a failed write of the target: its own message stands
    missing = tmp_path / "source.safetensors"
    with pytest.raises(FileNotFoundError) as info:
        atomic_write(tmp_path / "out.bin", lambda tmp: Path(tmp).write_bytes(missing.read_bytes()))
    assert info.value.filename == str(missing) and "cannot write" not in str(info.value)


def test_a_checkpoint_that_runs_out_of_space_names_its_step_and_keeps_the_last(
    tmp_path: Path,
) -> None:
    model = torch.nn.Linear(256, 256)
    save_checkpoint(tmp_path, 1, {"m": model})
    with _file_size_limit(1 << 16), pytest.raises(OSError, match=r"cannot write .*step-00000002"):
        save_checkpoint(tmp_path, 2, {"m": model}, torch.optim.Adam(model.parameters()))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000001"]
    assert load_latest_checkpoint(tmp_path, {"m": torch.nn.Linear(256, 256)}).step == 1
    assert _hidden(tmp_path) == []


def _fail_rename_into(monkeypatch: pytest.MonkeyPatch, target: Path) -> None:
    """os.replace of a new version into ``target`` fails (EIO); moving the old one aside and
    back (from a ``*.old`` folder) works."""
    real = os.replace

    def replace(src, dst) -> None:  # noqa: ANN001
        if Path(dst) == target and not Path(src).parent.name.endswith(".old"):
            raise OSError(errno.EIO, "Input/output error")
        real(src, dst)

    monkeypatch.setattr(_files.os, "replace", replace)


def test_a_failed_swap_puts_the_old_folder_back(tmp_path: Path, monkeypatch) -> None:
    # the old folder had been moved into a hidden .dst.*.old and the target was left missing
    target = tmp_path / "dst"
    atomic_folder(target, lambda d: (d / "a.txt").write_text("old"))
    _fail_rename_into(monkeypatch, target)
    with pytest.raises(OSError, match="cannot write .*dst"):
        atomic_folder(target, lambda d: (d / "a.txt").write_text("new"))
    assert (target / "a.txt").read_text() == "old"
    assert _hidden(tmp_path) == []


def test_a_failed_merge_leaves_every_component_as_it_was(tmp_path: Path, monkeypatch) -> None:
    # A folder with the user's own file: each entry is swapped on its own. One refused rename
    # used to leave the earlier entries new and this one missing (a pipeline without its VAE).
    target = tmp_path / "pipe"
    atomic_folder(target, lambda d: [(d / n).mkdir() or (d / n / "w").write_text("old")
                                     for n in ("transformer", "vae")])  # fmt: skip
    (target / "notes.md").write_text("mine")
    _fail_rename_into(monkeypatch, target / "vae")
    with pytest.raises(OSError):
        atomic_folder(target, lambda d: [(d / n).mkdir() or (d / n / "w").write_text("new")
                                         for n in ("transformer", "vae")])  # fmt: skip
    got = {
        p.relative_to(target).as_posix(): p.read_text() for p in target.rglob("*") if p.is_file()
    }
    assert got == {"transformer/w": "old", "vae/w": "old", "notes.md": "mine"}
    assert _hidden(tmp_path) == []


def test_swap_in_moves_every_pair_or_none(tmp_path: Path, monkeypatch) -> None:
    for name in ("a", "b"):
        (tmp_path / f"new_{name}").write_text(f"new {name}")
        (tmp_path / name).write_text(f"old {name}")
    swap_in([(tmp_path / "new_a", tmp_path / "a"), (tmp_path / "new_b", tmp_path / "b")])
    assert [(tmp_path / n).read_text() for n in "ab"] == ["new a", "new b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_a_failed_resave_of_a_checkpoint_keeps_it(tmp_path: Path, monkeypatch) -> None:
    # the step's old copy had been moved into .tmp-step-N-old-*, which the next save's
    # clean-up of unfinished checkpoints then deleted: the step was gone for good
    model = torch.nn.Linear(3, 2)
    save_checkpoint(tmp_path, 2, {"m": model})
    save_checkpoint(tmp_path, 3, {"m": model}, extra={"copy": "first"})
    _fail_rename_into(monkeypatch, tmp_path / "step-00000003")
    with pytest.raises(OSError, match="step-00000003"):
        save_checkpoint(tmp_path, 3, {"m": model}, extra={"copy": "second"})
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]
    assert load_latest_checkpoint(tmp_path).extra == {"copy": "first"}
    assert _hidden(tmp_path) == []


def test_a_checkpoint_left_aside_by_a_killed_resave_is_restored(tmp_path: Path) -> None:
    # what a kill between the two renames of a re-save leaves: the step only in the aside folder
    model = torch.nn.Linear(3, 2)
    save_checkpoint(tmp_path, 3, {"m": model}, extra={"copy": "only"})
    aside = tmp_path / ".step-00000003.k1ll.old"
    aside.mkdir()
    os.replace(tmp_path / "step-00000003", aside / "step-00000003")
    save_checkpoint(tmp_path, 4, {"m": model})  # its clean-up puts step 3 back
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000003", "step-00000004"]
    assert json.loads((tmp_path / "step-00000003" / "state.json").read_text())["extra"] == {
        "copy": "only"
    }
    assert _hidden(tmp_path) == []


def test_a_file_under_a_new_checkpoint_has_the_mode_of_a_new_file(tmp_path: Path) -> None:
    mask = os.umask(0o022)
    try:
        final = save_checkpoint(tmp_path, 1, {"m": torch.nn.Linear(3, 2)})
    finally:
        os.umask(mask)
    assert {p.name: p.stat().st_mode & 0o777 for p in final.iterdir()} == {
        name: 0o644 for name in ("model.safetensors", "rng.pt", "state.json")
    }
    assert load_file(final / "model.safetensors")  # readable
