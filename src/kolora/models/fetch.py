"""Model and dataset downloads for login nodes, and the offline check of what arrived.

``kolora fetch models --to DIR`` downloads with ModelScope's snapshot download:
- layout ``diffusers`` (default): Kwai-Kolors/Kolors-diffusers → DIR/Kolors-diffusers;
- layout ``diffsynth``: the files DiffSynth's ``download_models(["Kolors"])`` takes from Kwai-Kolors/Kolors →
  DIR/kolors/Kolors/{text_encoder/, unet/, vae/} (DIR is then DiffSynth's ``models/`` folder);
and, for both, the fp16-fix SDXL VAE (AI-ModelScope/sdxl-vae-fp16-fix) → DIR/sdxl-vae-fp16-fix.
``kolora fetch dataset ID --to DIR`` downloads a ModelScope dataset repository.

Before downloading, the hub is probed with one short HTTP request (to the endpoint modelscope itself uses:
``MODELSCOPE_ENDPOINT`` / ``MODELSCOPE_DOMAIN`` / its default; through the environment's proxy if one is set), so
a compute node without internet fails in seconds with a message to run the command on a login node, instead of
hanging in retries. Download errors later on get the same advice.

After downloading, and offline with ``kolora check models DIR``, every expected file is verified: present,
non-empty, JSON parses, safetensors headers readable (only the 8-byte length + JSON header is read, and the
tensors' byte ranges must fit in the file, which catches truncated downloads), every shard an index names is
there, torch ``.bin`` files start like a zip or pickle. The report ends with the config lines to use.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kolora.core.errors import InputError, RunFailure
from kolora.core.offline import offline_variable

KOLORS_DIFFUSERS = "Kwai-Kolors/Kolors-diffusers"
KOLORS_DIFFSYNTH = "Kwai-Kolors/Kolors"
VAE_FP16_FIX = "AI-ModelScope/sdxl-vae-fp16-fix"
# DiffSynth's preset for "Kolors" (text_encoder/ also holds ChatGLM's tokenizer files in Kwai-Kolors/Kolors)
DIFFSYNTH_PATTERNS = ["text_encoder/*", "unet/diffusion_pytorch_model.safetensors",
                      "vae/diffusion_pytorch_model.safetensors"]
VAE_PATTERNS = ["config.json", "diffusion_pytorch_model.safetensors"]
DEFAULT_PROBE_TIMEOUT = 5.0


class FetchError(RunFailure):
    """A download that cannot happen here (no network) or that arrived incomplete."""


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


# network ----------------------------------------------------------------------------------------------------
def hub_endpoint() -> str:
    """The endpoint modelscope downloads from, by its own precedence: MODELSCOPE_ENDPOINT, then the deprecated
    MODELSCOPE_DOMAIN, then modelscope's default."""
    for var in ("MODELSCOPE_ENDPOINT", "MODELSCOPE_DOMAIN"):
        value = os.environ.get(var, "").strip().rstrip("/")
        if value:
            return value if "://" in value else f"https://{value}"
    from modelscope.hub.utils.utils import get_endpoint

    return get_endpoint()


def _reach(url: str, timeout: float) -> str | None:
    """None if `url` answers an HTTP request (any status) within about `timeout` s, DNS and TLS included (proxies
    from the environment are used, as modelscope's own requests use them); else the reason."""
    import requests

    result: dict[str, str | None] = {}

    def attempt() -> None:
        try:
            requests.head(url, timeout=(timeout, timeout), allow_redirects=False)
            result["why"] = None
        except requests.RequestException as e:
            result["why"] = f"{e.__class__.__name__}: {str(e)[:300]}"

    t = threading.Thread(target=attempt, daemon=True)  # a thread, because DNS lookups ignore timeouts
    t.start()
    t.join(2 * timeout + 1)
    if t.is_alive() or "why" not in result:
        return f"no answer within {2 * timeout + 1:g} s"
    return result["why"]


def _login_node_advice(command: str) -> str:
    check = "kolora check dataset DIR" if " dataset " in command else "kolora check models DIR"
    return (f"Downloads need internet access, which compute nodes usually lack: run `{command}` on a login node "
            "(or any machine with network that sees the same file system), then verify the copy where the jobs "
            f"run with `{check}` (offline).")


def probe_hub(timeout: float = DEFAULT_PROBE_TIMEOUT, command: str = "kolora fetch models --to DIR") -> str:
    """Return the hub endpoint if it answers; raise FetchError with the login-node advice if not."""
    endpoint = hub_endpoint()
    if offline_variable("modelscope"):
        why = "MODELSCOPE_OFFLINE is set, as kolora sets it for compute jobs"
    else:
        why = _reach(endpoint, timeout)
    if why:
        raise FetchError(f"cannot reach the ModelScope hub at {endpoint} ({why}).\n{_login_node_advice(command)}")
    return endpoint


def _snapshot_download(repo_id: str, local_dir: Path, allow_patterns: list[str] | None = None,
                       repo_type: str = "model") -> None:
    from modelscope.hub.snapshot_download import dataset_snapshot_download, snapshot_download

    local_dir.mkdir(parents=True, exist_ok=True)
    if repo_type == "dataset":
        dataset_snapshot_download(repo_id, local_dir=str(local_dir), allow_patterns=allow_patterns)
    else:
        snapshot_download(repo_id, local_dir=str(local_dir), allow_patterns=allow_patterns)


Downloader = Callable[..., None]


def _download(download: Downloader, command: str, repo_id: str, *args: Any, **kwargs: Any) -> None:
    try:
        download(repo_id, *args, **kwargs)
    except Exception as e:  # noqa: BLE001 - modelscope raises network, HTTP and hub errors of many types
        first = str(e).strip().splitlines()[0][:400] if str(e).strip() else ""
        raise FetchError(f"downloading {repo_id} failed ({e.__class__.__name__}: {first}).\nA partial download "
                         f"resumes when the command is run again. {_login_node_advice(command)}") from e


def fetch_models(to: Path, layout: str = "diffusers", timeout: float = DEFAULT_PROBE_TIMEOUT,
                 download: Downloader | None = None) -> Report:
    """Download Kolors (+ the fp16-fix VAE) under `to` in `layout`, then check it."""
    if layout not in ("diffusers", "diffsynth"):
        raise InputError(f"unknown layout {layout!r} (diffusers or diffsynth)")
    probe_hub(timeout, f"kolora fetch models --to {to}" + (" --layout diffsynth" if layout == "diffsynth" else ""))
    command = f"kolora fetch models --to {to}" + (" --layout diffsynth" if layout == "diffsynth" else "")
    download = download or _snapshot_download
    to = Path(to).resolve()
    if layout == "diffusers":
        _download(download, command, KOLORS_DIFFUSERS, to / "Kolors-diffusers")
    else:
        _download(download, command, KOLORS_DIFFSYNTH, to / "kolors" / "Kolors", DIFFSYNTH_PATTERNS)
    _download(download, command, VAE_FP16_FIX, to / "sdxl-vae-fp16-fix", VAE_PATTERNS)
    return check_models(to)


def fetch_dataset(dataset_id: str, to: Path, timeout: float = DEFAULT_PROBE_TIMEOUT,
                  download: Downloader | None = None) -> Report:
    command = f"kolora fetch dataset {dataset_id} --to {to}"
    probe_hub(timeout, command)
    download = download or _snapshot_download
    to = Path(to).resolve()
    _download(download, command, dataset_id, to, None, repo_type="dataset")
    from kolora.ingest.sources import check_folder

    report = check_folder(to)
    report.config["data"] = {"source": "modelscope", "dataset_id": dataset_id, "path": str(to)}
    return report


# file checks ------------------------------------------------------------------------------------------------
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


def _variant(unet: Path) -> str | None:
    """'fp16' when a diffusers folder has only *.fp16.* weights (Kolors-diffusers ships those)."""
    plain = list(unet.glob("diffusion_pytorch_model.safetensors")) + list(unet.glob("diffusion_pytorch_model.bin"))
    fp16 = list(unet.glob("diffusion_pytorch_model.fp16.*"))
    return "fp16" if fp16 and not plain else None


def _check_diffusers(c: FileChecker, root: Path) -> dict[str, Any]:
    if c.file(root / "model_index.json", "diffusers pipeline index"):
        index = json.loads((root / "model_index.json").read_text())
        for name, spec in index.items():
            if not name.startswith("_") and isinstance(spec, list) and spec and spec[0] is not None \
                    and not (root / name).is_dir():
                c.r.problems.append(f"missing: {c.rel(root / name)}/ (listed in model_index.json)")
    for comp in ("unet", "vae"):
        c.file(root / comp / "config.json")
        c.weights(root / comp, ("diffusion_pytorch_model",))
    c.file(root / "text_encoder" / "config.json")
    c.weights(root / "text_encoder", ("model", "pytorch_model"))
    c.file(root / "tokenizer" / "tokenizer.model", "ChatGLM sentencepiece model")
    c.file(root / "scheduler" / "scheduler_config.json")
    model: dict[str, Any] = {"layout": "diffusers", "path": str(root)}
    if _variant(root / "unet"):
        model["variant"] = "fp16"
    return model


def _check_vae(c: FileChecker, folder: Path, model: dict[str, Any]) -> None:
    weights = folder / "diffusion_pytorch_model.safetensors"
    if not folder.is_dir():
        c.r.warnings.append(f"{c.rel(folder)}/ not found: the fp16-fix SDXL VAE is needed for fp16 training "
                            f"(`kolora fetch models` downloads it), or set model.vae_path")
        return
    if c.file(weights, "fp16-fix SDXL VAE"):
        model["vae_path"] = str(folder if (folder / "config.json").is_file() else weights)
    if (folder / "config.json").exists():
        c.file(folder / "config.json")


def _check_diffsynth(c: FileChecker, models_dir: Path, kolors: Path) -> dict[str, Any]:
    c.file(kolors / "unet" / "diffusion_pytorch_model.safetensors", "Kolors UNet")
    c.file(kolors / "vae" / "diffusion_pytorch_model.safetensors", "Kolors VAE")
    c.file(kolors / "text_encoder" / "config.json", "ChatGLM3 config")
    c.weights(kolors / "text_encoder", ("pytorch_model", "model"))
    model: dict[str, Any] = {"layout": "diffsynth", "path": str(models_dir)}
    tiny = models_dir / "tiny-configs"
    toks = [kolors / "tokenizer" / "tokenizer.model", kolors / "text_encoder" / "tokenizer.model"]
    if any(t.is_file() for t in toks):
        c.file(next(t for t in toks if t.is_file()), "ChatGLM tokenizer")
    elif (tiny / "tokenizer" / "tokenizer.model").is_file():
        c.file(tiny / "tokenizer" / "tokenizer.model", "tiny tokenizer")
    else:
        c.r.warnings.append(f"no tokenizer.model in {c.rel(kolors)}/text_encoder or /tokenizer: set "
                            "model.tokenizer_path (Kolors-diffusers' tokenizer/ or DiffSynth's "
                            "diffsynth/tokenizer_configs/kolors/tokenizer)")
    if tiny.is_dir():  # kolora's tiny DiffSynth layout keeps the configs DiffSynth's folders lack
        for name, key in (("unet_config.json", "unet_config"), ("vae_config.json", "vae_config")):
            if c.file(tiny / name):
                model[key] = str(tiny / name)
        if (tiny / "tokenizer" / "tokenizer.model").is_file():
            model["tokenizer_path"] = str(tiny / "tokenizer")
    _check_vae(c, models_dir / "sdxl-vae-fp16-fix", model)
    return model


def detect_layout(path: Path) -> tuple[str, Path, Path | None]:
    """(layout, model root, diffsynth kolors folder or None) for a folder `check models` is pointed at."""
    path = Path(path)
    if (path / "model_index.json").is_file():
        return "diffusers", path, None
    if (path / "Kolors-diffusers").is_dir():
        return "diffusers", path / "Kolors-diffusers", None
    for models_dir in (path, path / "models"):
        if (models_dir / "kolors" / "Kolors").is_dir():
            return "diffsynth", models_dir, models_dir / "kolors" / "Kolors"
    if (path / "unet" / "diffusion_pytorch_model.safetensors").is_file() and not (path / "unet" / "config.json").is_file():
        return "diffsynth", path, path
    if (path / "unet" / "config.json").is_file():
        return "diffusers", path, None
    raise InputError(f"{path}: no Kolors model found: expected model_index.json or Kolors-diffusers/ (diffusers "
                     "layout, Kwai-Kolors/Kolors-diffusers) or kolors/Kolors/ (DiffSynth's models/ folder)")


def check_models(path: Path, layout: str | None = None) -> Report:
    """Verify a Kolors model folder offline (both layouts; also the folder `kolora fetch models --to` fills)."""
    path = Path(path).resolve()
    if not path.is_dir():
        raise InputError(f"{path} does not exist or is not a folder")
    found, root, kolors = detect_layout(path)
    if layout and layout != found:
        raise InputError(f"{path} looks like the {found} layout, not {layout}")
    report = Report(root=path, kind=f"Kolors, {found} layout")
    c = FileChecker(report)
    if found == "diffusers":
        model = _check_diffusers(c, root)
        vae = path / "sdxl-vae-fp16-fix" if root != path else None
        if vae is not None:
            _check_vae(c, vae, model)
    else:
        model = _check_diffsynth(c, root, kolors)
    report.config["model"] = model
    return report
