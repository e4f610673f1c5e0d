"""Which image paths named by dataset metadata ingest may bring into the run directory, and how.

A path is taken only when it resolves (symlinks followed) inside the dataset root, unless
`data.allow_external_paths` opts in for datasets that list absolute paths on purpose; it must then be a
regular file (not /dev/zero, a fifo, a socket or a folder) of at most `data.max_image_bytes`. Anything else is
rejected with its reason, which ingest records in data/rejected.jsonl and the filter report shows. A missing
file inside the root is not rejected here: the filter's header pass reports it ("missing file").

Permissions: what lands in the run directory is never more readable than its source. A hard link is the
source's inode, so it keeps the source's mode (kolora never chmods it: that would change the source); a copy,
and image bytes written from a parquet file, get the umask's default mode (0644 under umask 022) narrowed
to the source file's permission bits (a 0600 source gives a 0600 copy).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from kolora.core.rundir import current_umask

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a fifo"), (stat.S_ISSOCK, "a socket"))
_COPY_BLOCK = 1 << 20


class Unsafe(Exception):
    """The source file may not be brought into the run directory; str(e) is the reason for the report."""


def file_mode(source_mode: int | None = None) -> int:
    """The mode of a file kolora creates from a source: the umask's default, no wider than the source's."""
    mode = 0o666 & ~current_umask()
    return mode & stat.S_IMODE(source_mode) if source_mode is not None else mode


def _kind(st: os.stat_result) -> str:
    return next((name for test, name in _KINDS if test(st.st_mode)), "not a regular file")


@dataclass(frozen=True)
class PathGuard:
    """The rules for one dataset: its root (None: paths are not confined) and the size cap."""

    root: Path | None
    allow_external: bool
    max_bytes: int

    def check(self, path: Path) -> tuple[Path, os.stat_result | None]:
        """(the resolved path, its stat; None when it does not exist); raises Unsafe with the reason."""
        resolved = Path(os.path.realpath(path))
        if self.root is not None and not self.allow_external and not resolved.is_relative_to(self.root):
            raise Unsafe(f"outside the dataset root {self.root} ({path} resolves to {resolved}); set "
                         "data.allow_external_paths: true if the dataset lists such paths on purpose")
        try:
            st = os.stat(resolved)
        except FileNotFoundError:
            return resolved, None
        except OSError as e:
            raise Unsafe(f"unreadable path ({e.strerror or e})") from None
        if not stat.S_ISREG(st.st_mode):
            raise Unsafe(f"not a regular file ({path} is {_kind(st)})")
        self.check_size(st.st_size)
        return resolved, st

    def check_size(self, size: int) -> None:
        if size > self.max_bytes:
            raise Unsafe(f"file too large ({size} bytes > data.max_image_bytes {self.max_bytes})")


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def link_checked(src: Path, st: os.stat_result, dst: Path) -> bool:
    """Hard-link src (checked as `st`) to dst; False when linking is not possible here (another file system,
    no permission). A file swapped for another since the check is removed again and rejected."""
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        return False
    if not _same_file(os.lstat(dst), st):
        dst.unlink()
        raise Unsafe(f"{src} changed while it was being ingested")
    return True


def copy_checked(src: Path, st: os.stat_result | None, dst: Path, max_bytes: int | None = None) -> None:
    """Copy src to dst (created, mode no wider than src's), reading through one descriptor that is checked
    to be the regular file `st` describes (when given) and at most max_bytes long. OSError when unreadable."""
    fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # NONBLOCK: a fifo must not hang the open
    try:
        fst = os.fstat(fd)
        if not stat.S_ISREG(fst.st_mode) or (st is not None and not _same_file(fst, st)):
            raise Unsafe(f"{src} changed while it was being ingested")
        out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, file_mode(fst.st_mode))
        try:
            os.fchmod(out, file_mode(fst.st_mode))  # exactly that, whatever the umask did at creation
            copied = 0
            while block := os.read(fd, _COPY_BLOCK):
                copied += len(block)
                if max_bytes is not None and copied > max_bytes:
                    raise Unsafe(f"file too large (more than data.max_image_bytes {max_bytes} bytes)")
                _write_all(out, block)
        except BaseException:
            os.close(out)
            dst.unlink()
            raise
        os.close(out)
    finally:
        os.close(fd)


def copy_no_wider(src: Path | str, dst: Path | str) -> None:
    """Copy a file the run already holds (e.g. into trainset/) with a mode no wider than its source's."""
    copy_checked(Path(src), None, Path(dst))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_bytes(dst: Path, data: bytes, source_mode: int | None) -> None:
    """Write image bytes taken from a source file (parquet) with a mode no wider than that file's."""
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, file_mode(source_mode))
    try:
        os.fchmod(fd, file_mode(source_mode))
        _write_all(fd, data)
    finally:
        os.close(fd)
