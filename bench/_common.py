"""Shared by the bench/*.py scripts: machine/version header, tables, medians, bench/RESULTS.md, the RESULT line.

Every script prints a header (machine, versions), a table (medians of repeats, the baseline measured in the
same run, interleaved with the candidate), appends the same text as a dated section to bench/RESULTS.md
(unless --no-record) and ends with one line `RESULT <name> key=value ...` for machines to read.
Run as a script this file does nothing (the Makefile's `bench` target runs every bench/*.py).
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import platform
import re
import statistics
import subprocess
import sys
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "RESULTS.md"
PACKAGES = ("torch", "diffusers", "transformers", "peft", "lightning", "py-data-juicer", "datasets", "pillow",
            "ray", "submitit")

if str(REPO / "src") not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(1, str(REPO / "src"))


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--no-record", action="store_true", help=f"do not append to {RESULTS.relative_to(REPO)}")
    return p


def median(xs: Iterable[float]) -> float:
    return statistics.median(list(xs))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def _git() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return f"{sha}{' (modified)' if dirty else ''}" if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def gpu_description() -> str | None:
    """The CUDA device torch sees, or None (imports torch)."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    p = torch.cuda.get_device_properties(0)
    return f"{p.name}, {p.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}, {torch.cuda.device_count()} visible"


def environment(gpu: bool = False) -> dict[str, str]:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 0
    mem = _mem_gib()
    env = {
        "date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "host": platform.node(),
        "cpu": f"{_cpu_model()} ({cores} usable cores{f', {mem:.0f} GiB' if mem else ''})",
        "gpu": (gpu_description() or "none") if gpu else "not used",
        "python": platform.python_version(),
        "versions": ", ".join(f"{name} {_version(name)}" for name in PACKAGES if _version(name)),
        "kolora": _git(),
    }
    return env


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def fmt(v: Any, digits: int = 4) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        if v == 0:
            return "0"
        mag = math.floor(math.log10(abs(v)))
        return f"{v:.{max(0, digits - 1 - mag)}f}" if -3 <= mag < digits + 2 else f"{v:.{digits - 1}e}"
    return str(v)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[c if isinstance(c, str) else fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells[1:])])


def result_line(name: str, values: dict[str, Any]) -> str:
    parts = []
    for k, v in values.items():
        text = fmt(v)
        if any(c.isspace() for c in text) or "=" in text:
            raise ValueError(f"RESULT value for {k} must be one word, got {text!r}")
        parts.append(f"{k}={text}")
    return f"RESULT {name} " + " ".join(parts)


def report(name: str, title: str, env: dict[str, str], body: str, result: dict[str, Any], record: bool = True,
           notes: Sequence[str] = ()) -> str:
    """Print the section, append it to RESULTS.md (record=True), print the RESULT line last; return the line."""
    head = [f"## {name}: {title}", "", *(f"- {k}: {v}" for k, v in env.items()), "", ""]
    text = "\n".join(head) + body.rstrip() + "\n" + ("\n" + "\n".join(f"- {n}" for n in notes) + "\n" if notes else "")
    line = result_line(name, result)
    print(text)
    if record:
        record_section(RESULTS, text + "\n```\n" + line + "\n```\n")
        print(f"(appended to {RESULTS.relative_to(REPO)})")
    print(line, flush=True)
    return line


_RUNS_START, _RUNS_END = "<!-- runs: generated from the sections below -->", "<!-- end of runs -->"
_SECTION = re.compile(r"^## (?P<name>[\w-]+): .*?^RESULT (?P=name) (?P<result>.*?)$", re.S | re.M)


def runs_table(sections: str, max_pairs: int = 8) -> str:
    """One row per recorded run (date, benchmark, machine, GPU, kolora commit, the RESULT line's first pairs),
    derived from the sections themselves so it cannot disagree with them."""
    rows = []
    for m in _SECTION.finditer(sections):
        fields = dict(re.findall(r"^- (date|host|cpu|gpu|kolora): (.*)$", m.group(0), re.M))
        pairs = m.group("result").split()
        shown = " ".join(pairs[:max_pairs]) + (" …" if len(pairs) > max_pairs else "")
        rows.append([fields.get("date", "?"), m.group("name"), f"{fields.get('host', '?')}, {fields.get('cpu', '?')}",
                     fields.get("gpu", "?"), fields.get("kolora", "?"), f"`{shown}`"])
    return table(["date", "benchmark", "machine", "gpu", "kolora", "result"], rows)


def record_section(path: Path, section: str) -> None:
    """Append one run's section to RESULTS.md and regenerate the runs table at its top (atomic rewrite)."""
    from kolora.core.rundir import atomic_write_text

    text = path.read_text(encoding="utf-8") if path.exists() else RESULTS_HEADER
    if _RUNS_START in text:
        head, rest = text.split(_RUNS_START, 1)
        body = rest.split(_RUNS_END, 1)[1]
    else:  # a new file
        head, body = RESULTS_HEADER, text.removeprefix(RESULTS_HEADER)
    body = "\n\n".join(part.strip("\n") for part in (body, section) if part.strip())
    atomic_write_text(path, head.rstrip("\n") + "\n\n" + _RUNS_START + "\n\n" + runs_table(body) + "\n\n"
                      + _RUNS_END + "\n\n" + body + "\n")


def skip(name: str, reason: str, code: str) -> int:
    """A bench that cannot run here: one clear line, a RESULT line, exit status 0."""
    print(f"skipped: {reason}")
    print(result_line(name, {"skipped": code}), flush=True)
    return 0


# full-size random Kolors (GPU benches) ----------------------------------------------------------------------
# Dense bf16 (= fp16) tensor-core peaks from the vendors' data sheets, TFLOP/s, matched against the device name.
GPU_PEAK_TFLOPS = {"H200": 989, "H100 PCIe": 756, "H100": 989, "H800": 989, "A100": 312, "A800": 312, "L40S": 362,
                   "A40": 150, "RTX 4090": 165, "A10": 125, "L4": 121}
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def gpu_peak_tflops(name: str) -> float | None:
    for key, peak in GPU_PEAK_TFLOPS.items():  # "H100 PCIe" is tried before "H100"
        if key in name:
            return float(peak)
    return None


def _init_chatglm(text_encoder) -> None:
    from kolora.models.kolors import init_chatglm

    init_chatglm(text_encoder, std=0.02)


def kolors_models(device: str, dtype, tiny: bool = False, parts=("unet", "text_encoder", "vae"),
                  tokenizer_dir: Path | None = None) -> dict[str, Any]:
    """Randomly initialised Kolors built directly on `device` in `dtype` (no weights on disk, no CPU copy):
    full size = packaged kolors-unet-config.json (2.58 B), ChatGLM3-6B shape (diffusers' ChatGLMConfig defaults +
    Kolors' 2-group multi-query attention), packaged SDXL VAE config; tiny = kolora.models.kolors' test models.
    `tokenizer` (a small sentencepiece ChatGLM tokenizer; fine for random weights) needs tokenizer_dir."""
    import tempfile

    import torch

    from kolora.models import kolors as models
    out: dict[str, Any] = {}
    if tiny:
        tok_dir = tokenizer_dir or Path(tempfile.mkdtemp(prefix="kolora-bench-tok-"))
        tokenizer, te, unet, vae, _ = models.build_tiny_components(tok_dir)
        built = {"tokenizer": tokenizer, "text_encoder": te, "unet": unet, "vae": vae}
        for name in (*parts, *(["tokenizer"] if tokenizer_dir else [])):
            m = built[name]
            out[name] = m if name == "tokenizer" else m.to(device=device, dtype=dtype)
        return out
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.kolors import ChatGLMModel
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig

    def config(name: str) -> dict[str, Any]:
        return {k: v for k, v in models.packaged_config(name).items() if not k.startswith("_")}

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            if "unet" in parts:
                out["unet"] = UNet2DConditionModel.from_config(config("kolors-unet-config.json"))
            if "text_encoder" in parts:
                te = ChatGLMModel(ChatGLMConfig(multi_query_attention=True, multi_query_group_num=2,
                                                add_qkv_bias=True, original_rope=True, use_cache=False),
                                  empty_init=False)
                _init_chatglm(te)
                out["text_encoder"] = te
            if "vae" in parts:
                out["vae"] = AutoencoderKL.from_config(config("sdxl-vae-config.json"))
    finally:
        torch.set_default_dtype(previous)
    for m in out.values():
        m.to(device=device, dtype=dtype)  # buffers created in float32 follow
    if tokenizer_dir is not None:
        out["tokenizer"] = models.build_tiny_components(tokenizer_dir)[0]
    return out


RESULTS_HEADER = """# kolora benchmark results

Appended by `bench/<name>.py`: one dated section per run and one row per run in the table below
(`--no-record` leaves this file alone). Each section names the machine and versions; numbers are medians of
repeats with the baseline measured in the same run. Compare numbers only within a section or between sections
from the same machine. The last line of each section is the script's machine-readable `RESULT` line.
"""


if __name__ == "__main__":
    sys.exit(0)
