"""Output files and directories: checked before any model loads, never clobbered, one writer at a time.

Rules every command follows (issue 12):
- An existing output is refused unless the user passed --overwrite (or, for `run --out`, --append).
  Character devices and FIFOs (/dev/stdout, /dev/full, a pipe) are not "clobbered" and need no flag.
- The parent directory must exist, the path must not be a directory, and both must be writable.
- Two outputs (or an output and the input) that resolve to the same file are refused.
- Each output file is held under an exclusive `fcntl.flock` while it is written. A second writer fails at
  once; the message names the holder's pid, read from /proc/locks (Linux). The lock lives with the process,
  so a killed writer leaves no stale lock file behind.
- Streams cannot hang the run before it starts: `-` is stdout, and a FIFO must have a reader within a few
  seconds (`open_stream`), else the run stops with one line instead of blocking in open() forever.
Stdlib only: the runtime and the exporter both use it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from pathlib import Path
from typing import BinaryIO

STDOUT = "-"  # `--out -`: the events on standard output
FIFO_READER_WAIT_S = 3.0  # how long a FIFO output may wait for its reader before the run gives up


class OutputError(ValueError):
    """An output path that cannot or must not be written. The message names the flag, the path and the fix."""


def _special(path: Path) -> bool:
    """A character device or FIFO: writing to it replaces nothing."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)


def is_stream(path: str | os.PathLike) -> bool:
    """`-` (stdout), a FIFO or a character device: written as a stream, never locked, replaced or truncated."""
    return str(path) == STDOUT or _special(Path(path))


def open_stream(path: str | os.PathLike, flag: str, wait_s: float = FIFO_READER_WAIT_S) -> BinaryIO:
    """An unbuffered binary writer for a stream output. `-` is a duplicate of stdout (closing it leaves stdout
    open). A FIFO is opened without blocking and retried until a reader appears, for at most `wait_s`; then
    OutputError says so. Once open, writes block as usual when the reader is slower (back pressure), and a
    reader that goes away makes the next write fail (EPIPE), which the sink reports."""
    if str(path) == STDOUT:
        return open(os.dup(1), "wb", buffering=0)  # noqa: SIM115 - the sink closes it
    p = Path(path)
    if not stat.S_ISFIFO(p.stat().st_mode):
        return open(p, "wb", buffering=0)  # noqa: SIM115 - a character device such as /dev/full
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fd = os.open(p, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError as e:
            if e.errno != errno.ENXIO:  # ENXIO: no process has the FIFO open for reading
                raise OutputError(f"{flag} {p}: cannot open the FIFO ({e.strerror})") from None
            if time.monotonic() >= deadline:
                raise OutputError(f"{flag} {p} is a FIFO with no reader (waited {wait_s:.0f} s); start the reader "
                                  f"first (e.g. `cat {p}`), or write to a file") from None
            time.sleep(0.05)
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    return open(fd, "wb", buffering=0)  # noqa: SIM115 - the sink closes it


def check_file(path: str | os.PathLike, flag: str, *, overwrite: bool = False, append: bool = False,
               can_append: bool = False) -> Path:
    """Refuse an output file path that is a directory, sits in a missing or read-only directory, or exists
    (unless overwrite/append). Call before any model loads."""
    p = Path(path)
    if p.is_dir():
        raise OutputError(f"{flag} {p} is a directory; give a file path inside it, e.g. {p / 'out'}")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"{flag} {p}: directory {parent} does not exist; create it first (mkdir -p {parent})")
    if _special(p):
        if not os.access(p, os.W_OK):
            raise OutputError(f"{flag} {p} is not writable (permission denied)")
        return p
    if p.exists():
        holder = lock_holder(p)
        if holder:
            raise OutputError(f"{flag} {p} is being written by another process ({holder}); wait for it to end "
                              f"or choose another path")
        if not (overwrite or append):
            hint = "--overwrite to replace it" + (" or --append to add to it" if can_append else "")
            raise OutputError(f"{flag} {p} already exists; pass {hint}, or choose another path")
        if not os.access(p, os.W_OK):
            raise OutputError(f"{flag} {p} is not writable (permission denied or read-only file system)")
    elif not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {p}: directory {parent} is not writable (permission denied or read-only "
                          f"file system); choose another directory")
    return p


def check_dir(path: str | os.PathLike, flag: str, *, overwrite: bool = False) -> Path:
    """Refuse an output directory (a bundle) that exists without --overwrite, is a file, or whose parent is
    missing or read-only. Call before any model is built."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputError(f"{flag} {p} is a file; a bundle is a directory, give a new directory path")
    if p.exists() and not overwrite:
        raise OutputError(f"{flag} {p} already exists; pass --overwrite to replace it, or choose another path")
    parent = p.resolve().parent
    while not parent.exists():  # atomic_output_dir creates missing parents
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {p}: directory {parent} is not writable (permission denied or read-only "
                          f"file system); choose another directory")
    return p


def _same(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def check_distinct(paths: dict[str, str | os.PathLike | None]) -> None:
    """Refuse two flags naming the same file (e.g. --out equal to --write-video, or --write-video = --source)."""
    named = [(flag, p) for flag, p in paths.items() if p is not None and str(p) != ""]
    for i, (flag_a, a) in enumerate(named):
        for flag_b, b in named[i + 1:]:
            if not _special(Path(a)) and _same(a, b):
                raise OutputError(f"{flag_a} and {flag_b} name the same file {Path(a).resolve()}; "
                                  f"give each its own path")


def lock_holder(path: str | os.PathLike) -> str | None:
    """'pid N' (or 'an unknown process') when another process holds an exclusive flock on `path`, else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return _proc_locks_pid(path) or "an unknown process"
    except OSError:
        return None
    finally:
        os.close(fd)  # also drops our probe lock
    return None


def _proc_locks_pid(path: str | os.PathLike) -> str | None:
    """The pid /proc/locks gives for a FLOCK on this file's inode (Linux); None elsewhere."""
    try:
        st = os.stat(path)
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split()
        if "FLOCK" not in parts or "->" in parts:
            continue
        i = parts.index("FLOCK")
        try:
            pid, dev = parts[i + 3], parts[i + 4]
            major, minor, inode = dev.split(":")
        except (IndexError, ValueError):
            continue
        if (int(inode) == st.st_ino and int(major, 16) == os.major(st.st_dev)
                and int(minor, 16) == os.minor(st.st_dev) and int(pid) != os.getpid()):
            return f"pid {pid}"
    return None


class FileLock:
    """Exclusive flock on an output file for as long as it is written; created if missing, never truncated
    (truncating is the sink's job, once the lock is ours)."""

    def __init__(self, path: str | os.PathLike, flag: str):
        self.path = Path(path)
        self.flag = flag
        self.fd: int | None = None
        self.created = not self.path.exists()
        if _special(self.path):
            return
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = _proc_locks_pid(self.path) or "an unknown process"
            raise OutputError(f"{flag} {self.path} is being written by another process ({holder}); wait for it "
                              f"to end or choose another path") from None
        self.fd = fd

    def release(self, remove_if_new_and_empty: bool = False) -> None:
        """Unlock; optionally remove the file if this run created it and wrote nothing (a failed start)."""
        if self.fd is None:
            return
        if remove_if_new_and_empty and self.created and os.fstat(self.fd).st_size == 0:
            self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None


def partial_dirs(target: str | os.PathLike) -> list[tuple[Path, int]]:
    """Leftover `.NAME.partial-*` folders beside `target` from exports that were killed, with their sizes."""
    t = Path(target).resolve()
    found = []
    if t.parent.is_dir():
        for d in sorted(t.parent.glob(".*.partial-*")):
            if d.is_dir():
                size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file() and not f.is_symlink())
                found.append((d, size))
    return found
