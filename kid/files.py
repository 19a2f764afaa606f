"""Files written so that a crash never leaves a half-written one where a good one was.

Every file ``kid`` writes (run reports, predictions, evaluation reports, the final model directory) is first
written under a temporary name in the same directory and then renamed over the target: ``os.replace`` is atomic
on POSIX file systems, so a reader (or a resumed run) sees the old file or the new one, never a mixture.
Checkpoints get the same treatment in :mod:`kid.training` (written into a staging directory, then renamed).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


def _fsync_directory(path: Path) -> None:
    # Make the rename itself durable (POSIX); not every platform can open a directory.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[Any]:
    """Open a temporary file beside ``path`` for writing; on success it replaces ``path``, on an exception it is
    removed and ``path`` is untouched.  ``mode``: "w" (text) or "wb"."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes only: mode 'w' or 'wb', got {mode!r}")
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory, not a file")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": encoding, "newline": ""})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            # keep the permissions of the file being replaced (mkstemp creates 0600)
            with contextlib.suppress(OSError):
                shutil.copymode(path, tmp)
        else:
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_directory(path.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike, payload: Any) -> None:
    """``payload`` as indented JSON (non-serialisable values as ``str``), atomically."""
    atomic_write_text(path, json.dumps(payload, indent=2, ensure_ascii=False, default=str) + "\n")


def replace_directory(staged: str | os.PathLike, target: str | os.PathLike) -> None:
    """Put the finished directory ``staged`` at ``target`` (same file system).

    A directory cannot be renamed over a non-empty one, so an existing ``target`` is first renamed aside, then
    removed once ``staged`` is in place: at every moment either the old or the new complete directory exists.
    """
    staged, target = Path(staged), Path(target)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
    os.replace(staged, target)
    _fsync_directory(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """A staging directory beside ``target`` to fill; on success it becomes ``target`` (:func:`replace_directory`),
    on an exception it is removed and ``target`` is untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    os.chmod(staged, 0o777 & ~_umask())  # mkdtemp makes it private (0700)
    try:
        yield staged
        replace_directory(staged, target)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
