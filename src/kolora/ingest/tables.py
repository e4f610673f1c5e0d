"""Table sources (a parquet dataset, a ModelScope dataset) read whole or by row ranges: what sharded ingest
reads (kolora.ingest.shards). A hub dataset is loaded once, on first use; a dataset that is not downloaded and
cannot be fetched here (no network, an offline switch set) fails naming the command that downloads it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kolora.core.config import ExperimentConfig
from kolora.core.offline import offline_variable
from kolora.core.rundir import RunDir
from kolora.ingest.sources import (
    MASK_COLUMN,
    DatasetError,
    Record,
    Rejected,
    check_columns,
    fills_text,
    parquet_rows,
    records,
    rows_to_records,
)

# datasets, modelscope: imported in the functions that use them (a login node's CLI starts without them)


def _offline_reason() -> str | None:
    if var := offline_variable():
        return f"{var} is set"
    try:
        from modelscope.hub.utils.utils import get_domain

        host = get_domain()
    except Exception:  # noqa: BLE001 - any failure here just means "use the default host"
        host = "www.modelscope.cn"
    host = host.split("://")[-1].split("/")[0]
    try:
        with socket.create_connection((host, 443), timeout=3):
            return None
    except OSError as e:
        return f"{host} cannot be reached ({e.__class__.__name__}: {e})"


def _load_modelscope(cfg: ExperimentConfig, cache_dir: Path) -> tuple[Any, str, Path]:
    """The hub dataset (or its local download) as a Hugging Face dataset of image and text columns, with
    the image cells left encoded; its name for the report and the folder relative image paths start from."""
    d = cfg.data
    ds_id = d.dataset_id or "<dataset id>"
    hint = f"run `modelscope download --dataset {ds_id} --local-dir DIR` on a login node and set data.path: DIR"
    if d.path is not None:
        if not d.path.exists():
            raise DatasetError(f"data.path: {d.path} does not exist; to fetch the dataset {hint}")
        target = str(d.path)
    else:
        why = _offline_reason()
        if why:
            raise DatasetError(f"data.dataset_id: the ModelScope dataset {ds_id} cannot be loaded from the hub here "
                               f"({why}); {hint}")
        target = d.dataset_id
    from datasets import Image as HFImage
    from modelscope.msdatasets import MsDataset

    try:
        ds = MsDataset.load(target, subset_name=d.subset, split=d.split,
                            cache_dir=os.environ.get("MODELSCOPE_CACHE") or str(cache_dir))
    except Exception as e:  # noqa: BLE001 - MsDataset raises anything from ValueError to HTTP errors
        raise DatasetError(f"data: MsDataset.load({target!r}, subset_name={d.subset!r}, split={d.split!r}) failed: "
                           f"{e.__class__.__name__}: {e}" + ("" if d.path else f"; {hint}")) from None
    hf = ds.to_hf_dataset() if hasattr(ds, "to_hf_dataset") else ds
    check_columns(list(hf.column_names), d.image_column, d.text_column, fills_text(d), f"dataset {target}")
    cols = [d.image_column] + ([d.text_column] if d.text_column in hf.column_names else [])
    if d.mask == "auto" and MASK_COLUMN in hf.column_names and MASK_COLUMN not in cols:
        cols.append(MASK_COLUMN)
    hf = hf.select_columns(cols)
    for col in (d.image_column, MASK_COLUMN) if MASK_COLUMN in cols else (d.image_column,):
        try:  # keep the encoded bytes / original paths instead of decoding every image to PIL
            hf = hf.cast_column(col, HFImage(decode=False))
        except Exception:  # noqa: BLE001 - not an image-like column; read it as it is
            pass
    return hf, str(target), Path(target) if d.path is not None else cache_dir


class TableSource:
    """A parquet or ModelScope source read by row ranges (ingest shards); the hub dataset loads once."""

    def __init__(self, cfg: ExperimentConfig, run: RunDir) -> None:
        self.cfg, self.cache_dir = cfg, run.root / ".cache" / "modelscope"
        self._hf: tuple[Any, str, Path] | None = None

    def _hub(self) -> tuple[Any, str, Path]:
        if self._hf is None:
            self._hf = _load_modelscope(self.cfg, self.cache_dir)
        return self._hf

    @property
    def where(self) -> str:
        return str(self.cfg.data.path or self.cfg.data.dataset_id)

    def rows(self) -> int:
        d = self.cfg.data
        if d.source == "parquet":
            return parquet_rows(d.path, d.image_column, d.text_column, fills_text(d))  # type: ignore[arg-type]
        return len(self._hub()[0])

    def records(self, rows: tuple[int, int] | None = None) -> Iterator[Record | Rejected]:
        d = self.cfg.data
        if d.source == "parquet":
            return records(d, rows)
        hf, target, base = self._hub()
        start, end = rows or (0, len(hf))
        part = hf if rows is None else hf.select(range(start, end))
        return rows_to_records(part, target, base, d.image_column, d.text_column, start)
