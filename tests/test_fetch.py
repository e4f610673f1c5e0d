"""fetch/check: fast failure without network (forced deterministically), offline verification of model folders."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kolora.cli.main import main
from kolora.ingest import fetch as dataset_fetch
from kolora.models import fetch
from kolora.models.check import check_models

REPO = Path(__file__).resolve().parent.parent


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: connections are refused


@pytest.fixture
def no_network(monkeypatch):
    """Point modelscope's endpoint at a closed local port: 'no network', the same with or without internet."""
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    for var in ("MODELSCOPE_DOMAIN", "MODELSCOPE_OFFLINE", "https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy",
                "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


def test_fetch_without_network_fails_fast_with_login_node_message(no_network, tmp_path, capsys):
    t0 = time.monotonic()
    assert main(["fetch", "models", "--to", str(tmp_path / "m")]) == 1
    assert main(["fetch", "dataset", "AI-ModelScope/lowres_anime", "--to", str(tmp_path / "d")]) == 1
    assert time.monotonic() - t0 < 30
    err = capsys.readouterr().err
    assert err.count("login node") == 2 and "cannot reach the ModelScope hub" in err
    assert "kolora check models DIR" in err and "kolora check dataset DIR" in err
    assert not (tmp_path / "m").exists()  # nothing was started


def test_fetch_as_a_process_fails_fast(no_network, tmp_path):
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "kolora.cli.main", "fetch", "models", "--to", str(tmp_path)],
                          capture_output=True, text=True, env=os.environ.copy(), timeout=60)
    assert proc.returncode == 1 and "login node" in proc.stderr
    assert time.monotonic() - t0 < 30


def test_compute_job_environment_fails_without_probing(monkeypatch, tmp_path):
    monkeypatch.setenv("MODELSCOPE_OFFLINE", "1")
    with pytest.raises(fetch.FetchError, match="login node"):
        fetch.fetch_models(tmp_path)


def test_probe_succeeds_when_the_endpoint_answers(monkeypatch):
    import http.server
    import threading

    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)  # answers 501
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        monkeypatch.setenv("MODELSCOPE_ENDPOINT", url)
        for var in ("MODELSCOPE_OFFLINE", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        assert fetch.probe_hub(timeout=2) == url
    finally:
        server.shutdown()
        server.server_close()


def test_download_errors_get_the_login_node_advice(monkeypatch, tmp_path):
    def failing_download(repo_id, *args, **kwargs):
        raise ConnectionError("TLS handshake failed\nlong traceback text")

    monkeypatch.setattr(fetch, "probe_hub", lambda *a, **k: "https://hub")
    with pytest.raises(fetch.FetchError, match="(?s)Kwai-Kolors/Kolors-diffusers failed.*TLS handshake.*login node"):
        fetch.fetch_models(tmp_path, download=failing_download)


@pytest.mark.parametrize("layout", ["diffusers", "diffsynth"])
def test_check_models_passes_on_tiny_models_and_prints_usable_config(layout, tiny_diffusers, tiny_diffsynth, capsys):
    from kolora.core.config import ModelConfig
    from kolora.models import kolors as models

    path = tiny_diffusers if layout == "diffusers" else tiny_diffsynth
    assert main(["check", "models", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"layout: {layout}" in out and f"path: {path}" in out
    report = check_models(path)
    assert report.ok and report.files >= 5 and report.bytes > 0
    models.resolve(ModelConfig(**report.config["model"]))  # the printed lines are a working model section


def test_check_models_names_the_missing_file(tiny_diffusers, tiny_diffsynth, tmp_path, capsys):
    d = shutil.copytree(tiny_diffusers, tmp_path / "d")
    (d / "unet" / "config.json").unlink()
    assert main(["check", "models", str(d)]) == 2  # the model folder is input to fix
    out = capsys.readouterr().out
    assert "missing: unet/config.json" in out and "FAILED" in out

    s = shutil.copytree(tiny_diffsynth, tmp_path / "s")
    shard = s / "kolors" / "Kolors" / "text_encoder" / "pytorch_model-00002-of-00002.bin"
    shard.unlink()
    report = check_models(s)
    assert report.problems == [f"missing: {shard.relative_to(s)} (shard named in pytorch_model.bin.index.json)"]


def test_check_models_catches_truncated_and_empty_weights(tiny_diffusers, tmp_path):
    d = shutil.copytree(tiny_diffusers, tmp_path / "d")
    unet = d / "unet" / "diffusion_pytorch_model.safetensors"
    data = unet.read_bytes()
    unet.write_bytes(data[: len(data) - 100])
    (d / "tokenizer" / "tokenizer.model").write_bytes(b"")
    problems = "\n".join(check_models(d).problems)
    assert "unet/diffusion_pytorch_model.safetensors: truncated" in problems
    assert "empty: tokenizer/tokenizer.model" in problems


def test_check_on_a_folder_without_a_model(tmp_path, capsys):
    assert main(["check", "models", str(tmp_path)]) == 2
    assert "no Kolors model found" in capsys.readouterr().err


@pytest.mark.parametrize("layout", ["diffusers", "diffsynth"])
def test_fetch_places_files_then_verifies(layout, monkeypatch, tiny_diffusers, tiny_diffsynth, tmp_path):
    """With the download replaced by a copy of the tiny model, fetch puts each repo where check expects it."""
    calls = []

    def fake_download(repo_id, local_dir, allow_patterns=None, repo_type="model"):
        calls.append((repo_id, Path(local_dir).relative_to(tmp_path), allow_patterns))
        if repo_id == fetch.KOLORS_DIFFUSERS:
            shutil.copytree(tiny_diffusers, local_dir)
        elif repo_id == fetch.KOLORS_DIFFSYNTH:
            shutil.copytree(tiny_diffsynth / "kolors" / "Kolors", local_dir)
            shutil.copytree(tiny_diffsynth / "tiny-configs", Path(local_dir).parent.parent / "tiny-configs")
        else:
            shutil.copytree(tiny_diffsynth / "sdxl-vae-fp16-fix", local_dir)

    monkeypatch.setattr(fetch, "probe_hub", lambda *a, **k: "https://hub")
    report = fetch.fetch_models(tmp_path, layout=layout, download=fake_download)
    assert report.ok, report.problems
    repo = fetch.KOLORS_DIFFUSERS if layout == "diffusers" else fetch.KOLORS_DIFFSYNTH
    assert calls[0][0] == repo and calls[1] == (fetch.VAE_FP16_FIX, Path("sdxl-vae-fp16-fix"), fetch.VAE_PATTERNS)
    model = report.config["model"]
    assert model["layout"] == layout
    assert model["vae_path"].startswith(str(tmp_path / "sdxl-vae-fp16-fix"))


def test_fetch_dataset_verifies_and_prints_data_lines(monkeypatch, tmp_path):
    def fake_download(repo_id, local_dir, allow_patterns=None, repo_type="model"):
        assert repo_type == "dataset"
        Path(local_dir).mkdir(parents=True)
        (Path(local_dir) / "README.md").write_text("x")
        (Path(local_dir) / "train.parquet").write_bytes(b"PAR1" + b"\0" * 8)  # footer missing

    monkeypatch.setattr(dataset_fetch, "probe_hub", lambda *a, **k: "https://hub")
    report = dataset_fetch.fetch_dataset("AI-ModelScope/lowres_anime", tmp_path / "ds", download=fake_download)
    assert report.problems == ["train.parquet: not a complete parquet file (PAR1 marker missing)"]
    assert report.config["data"]["dataset_id"] == "AI-ModelScope/lowres_anime"
