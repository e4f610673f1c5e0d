"""Model downloads for login nodes, and the hub machinery every `kolora fetch` shares.

``kolora fetch models --to DIR`` downloads with ModelScope's snapshot download:
- layout ``diffusers`` (default): Kwai-Kolors/Kolors-diffusers → DIR/Kolors-diffusers;
- layout ``diffsynth``: the files DiffSynth's ``download_models(["Kolors"])`` takes from Kwai-Kolors/Kolors →
  DIR/kolors/Kolors/{text_encoder/, unet/, vae/} (DIR is then DiffSynth's ``models/`` folder);
and, for both, the fp16-fix SDXL VAE (AI-ModelScope/sdxl-vae-fp16-fix) → DIR/sdxl-vae-fp16-fix.
Datasets (``kolora fetch dataset``) are downloaded by kolora.ingest.fetch, scorer models by
kolora.models.scorer_fetch, both through the probe and the error advice here.

Before downloading, the hub is probed with one short HTTP request (to the endpoint modelscope itself uses:
``MODELSCOPE_ENDPOINT`` / ``MODELSCOPE_DOMAIN`` / its default; through the environment's proxy if one is set), so
a compute node without internet fails in seconds with a message to run the command on a login node, instead of
hanging in retries. Download errors later on get the same advice.

After downloading, what arrived is verified as ``kolora check models DIR`` verifies it offline
(kolora.models.check).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kolora.core.errors import InputError, RunFailure
from kolora.core.files import Report
from kolora.core.offline import offline_variable
from kolora.models.check import check_models

# modelscope, requests: imported in the functions that use them (a login node's CLI starts without them)

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


def unreachable_reason(url: str, timeout: float) -> str | None:
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


def login_node_advice(command: str) -> str:
    """Where to run a download `command` instead, and how to verify its result offline."""
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
        why = unreachable_reason(endpoint, timeout)
    if why:
        raise FetchError(f"cannot reach the ModelScope hub at {endpoint} ({why}).\n{login_node_advice(command)}")
    return endpoint


def modelscope_download(repo_id: str, local_dir: Path, allow_patterns: list[str] | None = None,
                        repo_type: str = "model") -> None:
    """ModelScope's snapshot download of a model or dataset repository into `local_dir` (resumes)."""
    from modelscope.hub.snapshot_download import dataset_snapshot_download, snapshot_download

    local_dir.mkdir(parents=True, exist_ok=True)
    if repo_type == "dataset":
        dataset_snapshot_download(repo_id, local_dir=str(local_dir), allow_patterns=allow_patterns)
    else:
        snapshot_download(repo_id, local_dir=str(local_dir), allow_patterns=allow_patterns)


Downloader = Callable[..., None]


def download_or_advise(download: Downloader, command: str, repo_id: str, *args: Any, **kwargs: Any) -> None:
    """Run `download`; any error it raises becomes a FetchError with the login-node advice for `command`."""
    try:
        download(repo_id, *args, **kwargs)
    except Exception as e:  # noqa: BLE001 - modelscope raises network, HTTP and hub errors of many types
        first = str(e).strip().splitlines()[0][:400] if str(e).strip() else ""
        raise FetchError(f"downloading {repo_id} failed ({e.__class__.__name__}: {first}).\nA partial download "
                         f"resumes when the command is run again. {login_node_advice(command)}") from e


def fetch_models(to: Path, layout: str = "diffusers", timeout: float = DEFAULT_PROBE_TIMEOUT,
                 download: Downloader | None = None) -> Report:
    """Download Kolors (+ the fp16-fix VAE) under `to` in `layout`, then check it."""
    if layout not in ("diffusers", "diffsynth"):
        raise InputError(f"unknown layout {layout!r} (diffusers or diffsynth)")
    probe_hub(timeout, f"kolora fetch models --to {to}" + (" --layout diffsynth" if layout == "diffsynth" else ""))
    command = f"kolora fetch models --to {to}" + (" --layout diffsynth" if layout == "diffsynth" else "")
    download = download or modelscope_download
    to = Path(to).resolve()
    if layout == "diffusers":
        download_or_advise(download, command, KOLORS_DIFFUSERS, to / "Kolors-diffusers")
    else:
        download_or_advise(download, command, KOLORS_DIFFSYNTH, to / "kolors" / "Kolors", DIFFSYNTH_PATTERNS)
    download_or_advise(download, command, VAE_FP16_FIX, to / "sdxl-vae-fp16-fix", VAE_PATTERNS)
    return check_models(to)
