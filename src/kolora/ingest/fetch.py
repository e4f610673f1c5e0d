"""`kolora fetch dataset ID --to DIR`: a ModelScope dataset repository downloaded on a login node (the hub probed
first, errors with the login-node advice: kolora.models.fetch), then checked as `kolora check dataset DIR`
checks it offline (kolora.ingest.sources.check_folder)."""

from __future__ import annotations

from pathlib import Path

from kolora.core.files import Report
from kolora.ingest.sources import check_folder
from kolora.models.fetch import (
    DEFAULT_PROBE_TIMEOUT,
    Downloader,
    download_or_advise,
    modelscope_download,
    probe_hub,
)


def fetch_dataset(dataset_id: str, to: Path, timeout: float = DEFAULT_PROBE_TIMEOUT,
                  download: Downloader | None = None) -> Report:
    """Download dataset `dataset_id` into `to`, then check it; the report's config lines name the download."""
    command = f"kolora fetch dataset {dataset_id} --to {to}"
    probe_hub(timeout, command)
    download = download or modelscope_download
    to = Path(to).resolve()
    download_or_advise(download, command, dataset_id, to, None, repo_type="dataset")
    report = check_folder(to)
    report.config["data"] = {"source": "modelscope", "dataset_id": dataset_id, "path": str(to)}
    return report
