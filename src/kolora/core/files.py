"""The offline check of files that arrived by download or copy: present, non-empty, and intact as far as their
headers tell, without loading them.

JSON must parse; a safetensors file's header must be readable (only the 8-byte length + JSON header is read)
and the tensors' byte ranges must fit in the file, which catches truncated downloads; every shard an index
names must be there; torch ``.bin`` files must start like a zip or pickle; parquet files must carry their PAR1
markers at both ends. A `Report` collects what was found and ends with the config lines to use.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Report:
    """What a check found: fatal problems, warnings, totals, and the config lines to use."""

    root: Path
    kind: str
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    files: int = 0
    bytes: int = 0
    config: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def config_lines(self) -> str:
        lines = []
        for section, values in self.config.items():
            lines.append(f"{section}:")
            lines += [f"  {k}: {v}" for k, v in values.items()]
        return "\n".join(lines)

    def render(self) -> str:
        head = (f"{self.root}: {self.kind}, {self.files} files, {self.bytes / 1e9:.2f} GB checked")
        out = [head]
        out += [f"  MISSING/BROKEN: {p}" for p in self.problems]
        out += [f"  warning: {w}" for w in self.warnings]
        if self.ok:
            out.append("OK. Config lines to use:" if self.config else "OK.")
            if self.config:
                out.append(self.config_lines())
        else:
            out.append(f"FAILED: {len(self.problems)} problem(s); re-run the download on a login node "
                       "(it resumes) or fix the paths above.")
        return "\n".join(out)


def safetensors_problem(path: Path) -> str | None:
    """Read only the header (8-byte little-endian length + JSON); None if it is sound."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return "too short for a safetensors file"
        n = int.from_bytes(head, "little")
        if n < 2 or n > size - 8 or n > 100_000_000:
            return f"unreadable safetensors header (length field {n}, file {size} bytes)"
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            return "safetensors header is not valid JSON"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    have = size - 8 - n
    if ends and max(ends) > have:
        return f"truncated: its header needs {max(ends)} bytes of tensor data, the file has {have}"
    return None


def _torch_file_problem(path: Path) -> str | None:
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return None
    return "not a torch checkpoint (neither zip nor pickle)"


def _parquet_problem(path: Path) -> str | None:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(max(size - 4, 0))
        tail = f.read(4)
    return None if head == b"PAR1" and tail == b"PAR1" else "not a complete parquet file (PAR1 marker missing)"


class FileChecker:
    """Checks files under `report.root`, recording each problem (named relative to the root) in the report."""

    def __init__(self, report: Report):
        self.r = report

    def rel(self, p: Path) -> str:
        try:
            return str(Path(p).relative_to(self.r.root))
        except ValueError:
            return str(p)

    def file(self, p: Path, what: str = "") -> bool:
        """Check one file; record a problem naming it. True when it is sound."""
        p = Path(p)
        label = self.rel(p) + (f" ({what})" if what else "")
        if not p.is_file():
            self.r.problems.append(f"missing: {label}")
            return False
        size = p.stat().st_size
        self.r.files += 1
        self.r.bytes += size
        if size == 0:
            self.r.problems.append(f"empty: {label}")
            return False
        problem = None
        if p.suffix == ".safetensors":
            problem = safetensors_problem(p)
        elif p.suffix == ".json":
            try:
                json.loads(p.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as e:
                problem = f"not valid JSON ({e})"
        elif p.suffix in (".bin", ".pt", ".pth", ".ckpt"):
            problem = _torch_file_problem(p)
        elif p.suffix == ".parquet":
            problem = _parquet_problem(p)
        if problem:
            self.r.problems.append(f"{label}: {problem}")
            return False
        return True

    def index(self, idx: Path) -> None:
        if not self.file(idx, "shard index"):
            return
        weight_map = json.loads(idx.read_text()).get("weight_map", {})
        if not weight_map:
            self.r.problems.append(f"{self.rel(idx)}: has no weight_map")
        for shard in sorted(set(weight_map.values())):
            self.file(idx.parent / shard, f"shard named in {idx.name}")

    def weights(self, folder: Path, stems: tuple[str, ...]) -> None:
        """A component's weights: shard indexes (with all their shards) or single files."""
        if not folder.is_dir():
            self.r.problems.append(f"missing: {self.rel(folder)}/")
            return
        indexes = sorted(p for s in stems for p in folder.glob(f"{s}*.index*.json"))
        if indexes:
            for idx in indexes:
                self.index(idx)
            return
        singles = sorted(p for s in stems for ext in ("safetensors", "bin") for p in folder.glob(f"{s}*.{ext}"))
        if not singles:
            self.r.problems.append(f"missing: {self.rel(folder)}/{stems[0]}.safetensors (no weights in "
                                   f"{self.rel(folder)}/)")
        for p in singles:
            self.file(p)
