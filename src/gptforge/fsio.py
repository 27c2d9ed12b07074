"""Files made safely: atomic writes and folders, and paths that never replace what the user has.

The only place that knows how a file is written so that a crash, a full disk or Ctrl-C never leaves a
half-written file under the final name: everything is written to a temporary name next to the target
and renamed onto it in one step.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import os
import re
import shutil
import socket
import tempfile
from glob import escape as glob_escape
from pathlib import Path
from typing import Callable, Iterator

from .errors import OptionError, RunFolderError

# Writes that fail because the disk (or quota, or file size limit) is full, as the OS and the libraries
# that write in native code (safetensors, torch.save) word it.
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_FULL_WORDS = (
    "No space left on device",
    "StorageFull",
    "Disk quota exceeded",
    "File too large",
    "file write failed",
    "unexpected pos",
)  # the last two: torch.save's writer after a short write


def umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: Path) -> None:
    """Give `path` the permissions a plain `open` / `mkdir` would: tempfile and safetensors make 0600 files
    and 0700 folders, which another user or a web server cannot read."""
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask())


def disk_full(e: BaseException, path: str | os.PathLike) -> OSError | None:
    """An OSError(ENOSPC) naming `path` when `e` is a write that failed for lack of space, else None."""
    if isinstance(e, OSError) and e.errno is not None:
        full = e.errno in _FULL
    else:
        full = isinstance(e, Exception) and any(w in str(e) for w in _FULL_WORDS)
    if not full and isinstance(e, RuntimeError):  # torch.save does not always say why a write failed
        with contextlib.suppress(OSError):
            full = shutil.disk_usage(folder_of(Path(path).parent)).free < 1 << 20
    if not full:
        return None
    return OSError(errno.ENOSPC, "No space left on device (disk full)", str(path))


def describe_os_error(e: OSError) -> str | None:
    """One line for a file-system fault the user can fix (permissions, disk full, read-only, a file where a
    folder should be), naming the path; None for anything else."""
    where = e.filename or "a file"
    if e.errno in (errno.EACCES, errno.EPERM):
        return (
            f"{where}: permission denied; give yourself access to it, or use a path you can read (and write, for --out)"
        )
    if e.errno in _FULL:
        return (
            f"{where}: disk full (no space left on the device); free some space or write elsewhere. "
            "Nothing was half-written: files saved before are intact"
        )
    if e.errno == errno.EROFS:
        return f"{where}: the file system is read-only; write somewhere else"
    if e.errno == errno.ENOTDIR:
        return f"{where}: part of this path is a file, not a folder"
    if e.errno == errno.EISDIR:
        return f"{where}: is a folder, where a file is needed"
    return None


def check_out_folder(out: str | os.PathLike, force: bool, reads=()) -> Path:
    """Refuse an output folder that a command would replace whole while it holds something else: a folder the
    command reads (`reads`, or one that holds it), whatever `force` says; any other folder that is not empty,
    unless `force`."""
    out = Path(out)
    where = Path(os.path.realpath(out))  # through links: a link to the run folder is the run folder
    for source in (r for r in reads if r is not None and Path(r).exists()):
        real = Path(os.path.realpath(source))
        if where == real or where in real.parents:
            raise RunFolderError(
                f"--out {out}: {'is' if where == real else 'holds'} {source}, which this command reads "
                "and would replace; write to another folder"
            )
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise RunFolderError(
            f"--out {out}: already exists and is not empty; choose another folder or add --force to replace it"
        )
    return out


# Every temporary or set-aside name gptforge makes is `.NAME.tmp-gptforge-HOST-PID[-XXXXXXXX]` or
# `.NAME.old-gptforge-HOST-PID` (HOST: a hash of the host name, since pids are per host). Only names of that form
# are ever cleaned up: a user's own `.notes.tmp-draft` or `.env.old-config` is never touched.
_MARK = "gptforge"
_LEFTOVER = re.compile(rf"\.(?P<name>.+)\.(?P<kind>tmp|old)-{_MARK}-[0-9a-f]{{8}}-(?P<pid>\d+)(?:-[a-z0-9_]{{8}})?")


def _host() -> str:
    return hashlib.blake2b(socket.gethostname().encode(), digest_size=4).hexdigest()


def _set_aside(path: Path, kind: str) -> str:
    """The stem of a temporary (`kind` "tmp") or set-aside ("old") name for `path` made by this host; the pid
    follows it. The name is cut to 100 characters, so that the result fits any file system's 255."""
    return f".{path.name[:100]}.{kind}-{_MARK}-{_host()}-"


def remove_stale(target: str | os.PathLike) -> None:
    """Remove the temporary folders that processes of this host that are gone (a killed prepare or export) left
    beside `target`."""
    target = Path(os.path.abspath(target))
    stem = _set_aside(target, "tmp")
    for tmp in target.parent.glob(f"{glob_escape(stem)}*-*"):
        pid = tmp.name[len(stem) :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)) and _LEFTOVER.fullmatch(tmp.name):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to `target`; on success it replaces `target` in one rename.

    A crash or a full disk leaves the previous `target` untouched (and at worst a `.tmp-*` folder).
    """
    given, target = target, Path(os.path.abspath(target))
    if target.is_symlink():  # a link to a folder elsewhere (another disk): that folder is the one replaced
        target = Path(os.path.realpath(target))
    here = Path.cwd()
    if target == here or target in here.parents:  # replacing it would leave the shell in a deleted folder
        raise OptionError(
            f"{given}: is the folder you are working in (or holds it), and an output folder is replaced "
            "as a whole; name a new folder for it (e.g. ./out)"
        )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise OptionError(f"{given}: part of this path is a file, not a folder") from None
    remove_stale(target)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_set_aside(target, 'tmp')}{os.getpid()}-", dir=target.parent))
    try:
        honour_umask(tmp)
        yield tmp
        old = None
        if target.exists():
            old = target.with_name(f"{_set_aside(target, 'old')}{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        full = disk_full(e, target)
        if full is not None:
            raise full from e
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Call `write(tmp_path)` and then rename the result onto `path`."""
    path = Path(path)
    tmp = path.with_name(f"{_set_aside(path, 'tmp')}{os.getpid()}")
    try:
        write(tmp)
        honour_umask(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        full = disk_full(e, path)
        if full is not None:
            raise full from e
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 `text` to `path` atomically."""
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def read_json_lines(path: str | os.PathLike) -> list:
    """The records of a JSON Lines file that gptforge appends to (metrics.jsonl): lines cut short by a crash are
    skipped, and a file that is missing or unreadable has none."""
    import json

    try:
        lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


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


# --- run folders: leftovers of killed writes, and one process at a time -----------------------------------

LOCK_NAME = ".gptforge.lock"


def clean_leftovers(folder: str | os.PathLike) -> list[str]:
    """Remove the temporary files and folders that killed atomic writes left in `folder`, and put back a
    target that a kill caught between its two renames (`.NAME.old-gptforge-*` present, `NAME` gone): only names
    that gptforge makes (see `_LEFTOVER`), never a hidden file of the user's. Only safe while
    no other process writes there (hold `exclusive_lock`). Returns the names handled."""
    folder, done = Path(folder), []
    if not folder.is_dir():
        return done
    for entry in sorted(folder.iterdir()):
        name, match = entry.name, _LEFTOVER.fullmatch(entry.name)
        if match is None or (match["kind"] == "old" and len(match["name"]) >= 100):  # the user's, or a cut name
            continue
        original = folder / match["name"] if match["kind"] == "old" else None
        if original is not None and not original.exists():
            os.replace(entry, original)
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        done.append(name)
    return done


@contextlib.contextmanager
def exclusive_lock(
    folder: str | os.PathLike,
    what: str = "run",
    log: Callable[[str], None] = print,
    remove: Callable[[], bool] | None = None,
) -> Iterator[Path]:
    """Hold an exclusive lock on `folder` (the file `.gptforge.lock` in it) until the block exits.

    Another process holding it gets an error naming its process id. The operating system drops the lock
    when its holder dies (even by kill -9), so a lock left by a crash is taken over, with a message. When
    `remove()` is true at the end (the folder is a finished run, known by its other files), the lock file is
    deleted while still held; a process that opened it meanwhile finds it gone once it gets the lock, and
    takes the new one instead.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd, held = _open_lock(path, folder, what), False
    try:
        stale = os.pread(fd, 200, 0).decode(errors="replace").strip()
        if stale:
            log(f"{folder}: taking over the lock of an earlier {what} that did not finish ({stale})")
        me = f"pid {os.getpid()} on {socket.gethostname()}".encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, me, 0)
        held = True
        yield path
    finally:
        if held:  # any exit Python sees leaves an empty lock file, or none: nothing to take over
            os.ftruncate(fd, 0)
            if remove is not None and remove():
                path.unlink(missing_ok=True)
        os.close(fd)  # closing releases the lock


def _open_lock(path: Path, folder: Path, what: str) -> int:
    """A descriptor of `path`, locked; the lock file is the one in the folder now (not one just removed)."""
    for _ in range(5):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        if not _try_lock(fd):
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunFolderError(
                f"{folder}: another gptforge {what} is using this folder ({holder}); wait for it "
                "to finish or choose another --out"
            )
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        os.close(fd)  # its holder removed it as we opened it: lock the folder's new one
    raise RunFolderError(f"{folder}: its lock file keeps being replaced; is another gptforge {what} starting there?")


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


__all__ = [
    "read_json_lines",
    "LOCK_NAME",
    "atomic_dir",
    "atomic_write",
    "clean_leftovers",
    "dated_path",
    "describe_os_error",
    "disk_full",
    "exclusive_lock",
    "folder_of",
    "honour_umask",
    "remove_stale",
    "umask",
    "write_text",
]
