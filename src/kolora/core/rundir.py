"""The run directory: layout, atomic writes and the manifest.

Every stage writes its outputs with `atomic_write*` (temp file in the same folder, fsynced, + os.replace, then
the folder fsynced: a crashed node leaves the old file or the new one, on NFS and Lustre too); the pipeline
then writes the stage's completion marker (kolora.pipeline.registry decides what "complete" means). The
manifest is shared by concurrent jobs (render array tasks), so it is updated under an exclusive file lock.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kolora.core.config import ExperimentConfig, dump_config, load_config
from kolora.core.errors import InputError, disk_full_errno, read_text

# Temp names of the atomic writers: ".<name>.<mkstemp random>.kolora-tmp<suffix>" for files (the marker makes a
# killed writer's leftover recognisable to sweep_temp; the real suffix stays last for writers that pick the
# format by extension) and ".<name>.<random>.dirtmp" for folders.
TEMP_MARK = ".kolora-tmp"
_TEMP_FILE = re.compile(r"^\..+\.[a-z0-9_]+\.kolora-tmp.*$", re.S)
_TEMP_DIR = re.compile(r"^\..+\.[a-z0-9_]+\.dirtmp$", re.S)


class RunError(InputError):
    """A problem with a run directory, with a message naming the file and the fix."""


def current_umask() -> int:
    """The process umask, read without changing it (/proc), else by setting and restoring it."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def shareable(path: Path | str, folder: bool = False) -> None:
    """Give a file from mkstemp (0600) or a folder from mkdtemp (0700) the mode the umask allows (0644/0755
    under umask 022), as open() and mkdir() would: labmates can read a shared run or an exported LoRA."""
    os.chmod(path, (0o777 if folder else 0o666) & ~current_umask())


def fsync_dir(path: Path | str) -> None:
    """Flush a folder's entries (a rename, a new file) to disk, so that they survive a crash of the node.
    File systems that cannot fsync a folder (EINVAL, EBADF, ENOTSUP) are left to their own guarantees."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            return
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def _naming_a_full_disk(path: Path, needed: int | None = None) -> Iterator[None]:
    """A write of `path` that finds the disk or the quota full, in whatever error its writer raises (see
    errors.disk_full_errno), comes out as one OSError naming `path`, not the temp file it was written to."""
    try:
        yield
    except BaseException as e:
        code = disk_full_errno(e)
        if code is None:
            raise
        full = OSError(code, os.strerror(code), str(path))
        full.needed = needed  # type: ignore[attr-defined]  # for the message (errors.disk_full)
        raise full from e


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    with _naming_a_full_disk(path, len(data)):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_MARK)
        try:
            os.fchmod(fd, 0o666 & ~current_umask())
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            fsync_dir(path.parent)  # the rename itself, not only the data, must survive a crash
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_path(path: Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path next to `path` for writers that want a filename (PIL, safetensors, torch.save);
    it replaces `path` only if the block finishes."""
    path = Path(path)
    with _naming_a_full_disk(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                                   suffix=TEMP_MARK + (suffix or path.suffix))
        os.close(fd)
        try:
            yield Path(tmp)
            shareable(tmp)  # after the writer: some (safetensors) create the file anew
            fd = os.open(tmp, os.O_RDONLY)  # the writer's data on disk before the rename makes it the real file
            try:
                os.fsync(fd)  # a network file system may report a full disk or quota only here
            finally:
                os.close(fd)
            os.replace(tmp, path)
            fsync_dir(path.parent)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield an empty temp folder next to `path`; if the block finishes it takes `path`'s place (a previous
    `path` is removed), otherwise it is deleted. Leftovers of an interrupted earlier attempt are cleared."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.dirtmp"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".dirtmp"))
    try:
        shareable(tmp, folder=True)
        try:
            yield tmp
        except BaseException as e:  # a full disk: name the file by where it was going, <path>/<name>
            written = Path(str(e.filename)) if getattr(e, "filename", None) is not None else tmp
            if not written.is_relative_to(tmp):
                raise
            with _naming_a_full_disk(path / written.relative_to(tmp)):
                raise
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old.", suffix=".dirtmp"))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            fsync_dir(path.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
            fsync_dir(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def file_lock(path: Path | str, wait: bool = True) -> Iterator[bool]:
    """An exclusive flock on `path` (created) for the block: array tasks of one job taking turns. Yields
    whether it was taken: always when `wait`, else only when no other holder had it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def sweep_temp(run_root: Path | str) -> int:
    """Remove what killed writers left anywhere under the run directory: the temp files of atomic_write_*
    and atomic_path (".<name>.<random>.kolora-tmp…") and the temp folders of atomic_dir
    (".<name>.<random>.dirtmp"); nothing else. Returns how many were removed.

    Call it only while holding the run lock (kolora.core.runlock.acquire): a live writer's temp files look the
    same as a dead one's."""
    root = Path(run_root)
    removed = 0
    for folder, dirs, files in os.walk(root):  # does not follow links: only the run's own tree
        for name in [d for d in dirs if _TEMP_DIR.match(d) and not os.path.islink(os.path.join(folder, d))]:
            dirs.remove(name)
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
            removed += 1
        for name in files:
            if _TEMP_FILE.match(name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(folder, name))
                    removed += 1
    return removed


def unwritable(folder: Path | str) -> str | None:
    """Why files cannot be written in `folder` (made with its parents when missing), or None. The kernel's
    answer for this user (os.access: permissions, a read-only file system), then, for a folder that exists, a
    real probe file, created and removed (ACLs and root-squashed NFS that os.access does not see)."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        return (f"{folder} is a file, not a folder" if existing == folder else
                f"{existing} is a file, so the folder {folder} cannot be made inside it")
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable by this user (its permissions, or a read-only file system)"
    if existing == folder:
        try:
            fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-probe.", suffix=TEMP_MARK)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            return f"{folder} is not writable: creating a file in it failed ({e.strerror or e})"
    return None


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class RunDir:
    def __init__(self, root: Path | str):
        self.root = Path(root).resolve()

    # layout -------------------------------------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        return self.root / "config.yaml"

    @property
    def manifest_file(self) -> Path:
        return self.root / "manifest.json"

    # the stages' folders (each stage's spec names what it owns) and the launcher's
    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def filter(self) -> Path:
        return self.root / "filter"

    @property
    def trainset(self) -> Path:
        return self.root / "trainset"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def train(self) -> Path:
        return self.root / "train"

    @property
    def lora(self) -> Path:
        return self.root / "lora"

    @property
    def render(self) -> Path:
        return self.root / "render"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def slurm(self) -> Path:
        return self.root / "slurm"

    @property
    def grid_file(self) -> Path:
        return self.root / "grid.png"

    # binding a config -------------------------------------------------------------------------------
    def bind(self, cfg: ExperimentConfig) -> None:
        """Create the run directory for `cfg`, or check an existing one belongs to the same config.

        A stage whose inputs changed is reset by its marker check, so a changed config is allowed;
        the frozen config.yaml is replaced and the manifest records the new digest. A run folder that cannot
        be used (a file in its place, an unreadable manifest) stops this before anything is written."""
        if self.root.exists() and not self.root.is_dir():
            raise RunError(f"{self.root} is a file, not a run folder; move it away or choose another --name")
        self.read_manifest()
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config_file, dump_config(cfg))
        with self.manifest() as m:
            m.setdefault("created", now())
            m["name"] = cfg.name
            m["config_digest"] = cfg.digest()
            m["seeds"] = {"experiment": cfg.seed, "train": cfg.train.seed, "synthetic_data": cfg.data.synthetic.seed,
                          "render": "per prompt (see render.prompts)"}
            m.setdefault("stages", {})

    def load_config(self, name: str | None = None) -> ExperimentConfig:
        """The frozen config (with `name` in place of the one it was written with, when given)."""

        if not self.config_file.is_file():
            raise RunError(f"{self.root} is not a kolora run directory (no config.yaml)")
        return load_config(self.config_file, name=name)

    # manifest -----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def manifest(self) -> Iterator[dict[str, Any]]:
        """Read-modify-write the manifest under an exclusive lock (safe across concurrent jobs)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".manifest.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                m = self.read_manifest()
                yield m
                atomic_write_json(self.manifest_file, m)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def read_manifest(self) -> dict[str, Any]:
        """The manifest ({} before the first run); RunError naming the file when it cannot be read."""
        if not self.manifest_file.exists():
            return {}
        try:
            m = json.loads(read_text(self.manifest_file))
        except InputError as e:
            raise RunError(f"{e}; kolora cannot continue this run") from None
        except json.JSONDecodeError as e:
            raise RunError(f"{self.manifest_file}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                           "restore it, or move it away to start the run's record afresh (outputs are kept)") from None
        if not isinstance(m, dict):
            raise RunError(f"{self.manifest_file}: expected a JSON object, found {type(m).__name__}; restore it, "
                           "or move it away to start the run's record afresh (outputs are kept)")
        return m

    def record_stage(self, stage: str, **fields: Any) -> None:
        with self.manifest() as m:
            m.setdefault("stages", {}).setdefault(stage, {}).update(fields)


