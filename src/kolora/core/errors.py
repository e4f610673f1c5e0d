"""The failures kolora expects, and reading files so that a bad byte names its file.

Every expected failure is a `KoloraError` whose message names the file (and the field, where there is one),
what was found, and what is allowed or the fix. The CLI prints it as one message and exits with its
`exit_code`: 2 for input the user has to fix (`InputError`), 1 for a failure while running (`RunFailure`).
Anything else escaping a command is a bug in kolora and is shown with its traceback.
"""

from __future__ import annotations

import errno
import math
import re
from pathlib import Path

EXIT_OK, EXIT_FAILURE, EXIT_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 3


class KoloraError(Exception):
    """An expected failure with a message meant for the person running kolora."""

    exit_code = EXIT_FAILURE


class InputError(KoloraError, ValueError):
    """Input to fix: a config, profile, prompt set, dataset, LoRA file, run folder or command-line value."""

    exit_code = EXIT_INPUT


class ConfigError(InputError):
    """A config problem, with a message meant for the person who wrote the config."""


class RunFailure(KoloraError, RuntimeError):
    """Something failed while running (network, Slurm, a stage that found nothing to do)."""

    exit_code = EXIT_FAILURE


def decode_utf8(data: bytes, path: str | Path) -> str:
    """`data` as text (a UTF-8 byte-order mark is dropped); InputError naming `path` and the line otherwise."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise InputError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}); "
                         "save the file as UTF-8") from None


def read_text(path: str | Path) -> str:
    """A UTF-8 text file; InputError naming the file when it is missing, a folder, unreadable or not UTF-8."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise InputError(f"{path} is a folder, not a file") from None
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e.strerror or e})") from None
    return decode_utf8(data, path)


def describe_os_error(e: OSError) -> str:
    """'<file>: <what the system said>' for an OSError (a full disk, a permission, a path that is a file)."""
    files = [str(f) for f in (e.filename, e.filename2) if f is not None]
    what = e.strerror or str(e)
    return f"{' → '.join(files)}: {what}" if files else what


# A full file system, and a full quota (what a cluster's home and project folders usually hit first).
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how writers in Rust (safetensors) quote the OSError they met


def _chain(e: BaseException | None):
    """`e` and the exceptions it was raised from or while handling, as a traceback shows them."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)


def disk_full_errno(e: BaseException | None) -> int | None:
    """ENOSPC or EDQUOT when `e`, or an exception it was raised from, is a write that found the disk or the quota
    full: an OSError, or a writer's own error around one (safetensors: "... (os error 28)"; torch.save into a
    Python file: a RuntimeError raised while handling the file's OSError). None for any other failure."""
    for x in _chain(e):
        if isinstance(x, DiskFull | OSError) and x.errno in DISK_FULL_ERRNOS:
            return x.errno
        if (m := _RUST_OS_ERROR.search(str(x))) and int(m.group(1)) in DISK_FULL_ERRNOS:
            return int(m.group(1))
    return None


class DiskFull(RunFailure):
    """A write that found no space (or no quota) left: names the file and the stage, says that finished work is
    intact and that the same command continues once there is space. Made by `disk_full`."""

    def __init__(self, message: str, errno_: int, path: str | None, stage: str | None):
        super().__init__(message)
        self.errno, self.path, self.stage = errno_, path, stage


def disk_full(e: BaseException, stage: str | None = None) -> DiskFull | None:
    """`e` as a DiskFull (naming `stage`, when given) if it is a full disk or quota (see `disk_full_errno`); None
    otherwise. The file is the one kolora was writing: the atomic writers (kolora.core.rundir) put the destination,
    not their temp file, in the OSError, with how many bytes it needed when they know."""
    if isinstance(e, DiskFull) and (stage is None or e.stage is not None):
        return e
    code = disk_full_errno(e)
    if code is None:
        return None
    written = next((x for x in _chain(e) if isinstance(x, OSError) and x.filename is not None), None)
    path = e.path if isinstance(e, DiskFull) else str(written.filename) if written is not None else None
    needed = getattr(written, "needed", None)
    what = "the disk quota is exceeded" if code == errno.EDQUOT else "the disk is full (no space left on device)"
    fix = ("Raise the quota or free space under it (`quota -s` shows it)" if code == errno.EDQUOT
           else "Free space on that file system (`df -h` shows it)")
    message = (f"{f'{stage} stage: ' if stage else ''}{what}{f' writing {path}' if path else ''}"
               f"{f' (it needed {_size(needed)})' if needed else ''}. Finished work is intact: every file is written "
               f"under a temporary name and renamed only when complete, so nothing half-written was kept. {fix} and "
               "run the same command again: it continues where it stopped")
    return DiskFull(message, code, path, stage)


def _size(n: int) -> str:
    if n < 1024:
        return f"{n:,} bytes"
    exponent = min(int(math.log(n, 1024)), 3)
    return f"{n / 1024 ** exponent:.1f} {('KiB', 'MiB', 'GiB')[exponent - 1]}"
