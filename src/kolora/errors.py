"""The failures kolora expects, and reading files so that a bad byte names its file.

Every expected failure is a `KoloraError` whose message names the file (and the field, where there is one),
what was found, and what is allowed or the fix. The CLI prints it as one message and exits with its
`exit_code`: 2 for input the user has to fix (`InputError`), 1 for a failure while running (`RunFailure`).
Anything else escaping a command is a bug in kolora and is shown with its traceback.
"""

from __future__ import annotations

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
