"""Files made safely: atomic writes and folders, and paths that never replace what the user has.

The only place that knows how a file is written so that a crash, a full disk or Ctrl-C never leaves a
half-written file under the final name: everything is written to a temporary name next to the target
and renamed onto it in one step.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to `target`; on success it replaces `target` in one rename.

    A crash or a full disk leaves the previous `target` untouched (and at worst a `.tmp-*` folder).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Call `write(tmp_path)` and then rename the result onto `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 `text` to `path` atomically."""
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def folder_of(path: str | os.PathLike) -> Path:
    """The folder a path names: itself when it is a folder, else the folder holding the file."""
    path = Path(path)
    return path if path.is_dir() else path.parent


def dated_path(folder: str | os.PathLike, seed: int) -> Path:
    """A new file name `gptforge-<date>-seed<seed>[-n].txt` in `folder` that no existing file has."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path, n = Path(folder) / f"gptforge-{stamp}-seed{seed}.txt", 1
    while path.exists():
        n += 1
        path = Path(folder) / f"gptforge-{stamp}-seed{seed}-{n}.txt"
    return path


__all__ = ["atomic_dir", "atomic_write", "dated_path", "folder_of", "write_text"]
