"""Shared fixtures: tiny Kolors models (both layouts) built once per session, full-size Kolors configs without
weights (for the memory planner), and one demo run."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "configs" / "demo.yaml"
PROMPTS = REPO / "configs" / "prompts" / "anime-story.yaml"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_diffusers(tmp_path_factory) -> Path:
    from kolora.models.kolors import build_tiny

    return build_tiny(tmp_path_factory.mktemp("models") / "tiny-diffusers", layout="diffusers")


@pytest.fixture(scope="session")
def tiny_diffsynth(tmp_path_factory) -> Path:
    from kolora.models.kolors import build_tiny

    return build_tiny(tmp_path_factory.mktemp("models") / "tiny-diffsynth", layout="diffsynth")


@pytest.fixture(scope="session")
def kolors_configs(tmp_path_factory) -> Path:
    """Kolors-diffusers' layout with its configs and no real weights: the packaged Kolors UNet and SDXL VAE configs
    (the VAE as diffusers saves the SDXL one, force_upcast on), ChatGLM3-6B's shape (diffusers' ChatGLMConfig
    defaults + Kolors' 2-group multi-query attention, as bench/_common.py builds it), and stand-ins for the
    files preflight checks (models.check_files reads their headers): a one-tensor safetensors file as each
    component's weights and a placeholder tokenizer.model. Nothing else is read on the meta device."""
    import numpy as np
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig
    from safetensors.numpy import save_file

    from kolora.models.kolors import packaged_config

    root = tmp_path_factory.mktemp("kolors-configs")
    for part in ("unet", "vae", "text_encoder", "tokenizer"):
        (root / part).mkdir()
    (root / "model_index.json").write_text(json.dumps({"_class_name": "KolorsPipeline"}))
    (root / "unet" / "config.json").write_text(json.dumps(packaged_config("kolors-unet-config.json")))
    (root / "vae" / "config.json").write_text(json.dumps({**packaged_config("sdxl-vae-config.json"),
                                                         "force_upcast": True}))
    ChatGLMConfig(multi_query_attention=True, multi_query_group_num=2, add_qkv_bias=True, original_rope=True,
                  use_cache=True).save_pretrained(str(root / "text_encoder"))
    (root / "tokenizer" / "tokenizer.model").write_bytes(b"placeholder")
    for weights in ("unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model", "text_encoder/model"):
        save_file({"placeholder": np.zeros(1, np.float32)}, str(root / f"{weights}.safetensors"))
    return root


def tree_state(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under root with its size, mtime and mode: a write or a deletion changes it."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (st.st_size if p.is_file() else 0, st.st_mtime_ns, st.st_mode)
    return out


def run_cli(argv: list[str]) -> int:
    """`kolora ARGV` in this process: its exit status, also when argparse refuses an argument value itself."""
    from kolora.cli.main import main

    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code)


def demo_overrides(model_path: Path, *extra: str) -> list[str]:
    return [f"model.path={model_path}", *extra]


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, tiny_diffusers):
    """`kolora run configs/demo.yaml` once (in process), shared by the tests that only read its outputs."""
    from kolora.cli.main import main

    runs = tmp_path_factory.mktemp("runs")
    rc = main(["run", str(DEMO), "--runs-dir", str(runs), "--set", f"model.path={tiny_diffusers}"])
    assert rc == 0
    return runs / "demo"


def untrained_copy(demo_run: Path, dst: Path):
    """A copy of the demo run at dst with its cache but no training, LoRA or tiles: (RunDir, its config)."""
    import shutil

    from kolora.core.rundir import RunDir

    shutil.copytree(demo_run, dst)
    for d in ("train", "lora", "render"):
        shutil.rmtree(dst / d, ignore_errors=True)
    run = RunDir(dst)
    return run, run.load_config()


def unet_inputs(unet):
    """Fixed random inputs for a Kolors-shaped UNet (8x8 latents, 7 tokens), for comparing outputs."""
    import torch

    g = torch.Generator().manual_seed(0)
    c = unet.config
    return dict(sample=torch.randn(1, 4, 8, 8, generator=g), timestep=torch.tensor([500]),
                encoder_hidden_states=torch.randn(1, 7, c.encoder_hid_dim, generator=g),
                added_cond_kwargs={"text_embeds": torch.randn(1, c.encoder_hid_dim, generator=g),
                                   "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])})


# ---- the dev Slurm cluster (tests marked slurm) ----------------------------------------------------------
@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    """The dev Slurm cluster's client environment (skips the test when the cluster is not up)."""
    import re
    import subprocess

    root = os.environ.get("KOLORA_DEVCLUSTER")
    path = (Path(root) if root else REPO / ".devcluster") / "env.sh"
    if not path.is_file():
        pytest.skip(f"no dev cluster: {path} does not exist (start one with `make cluster-up`)")
    values = dict(re.findall(r"^export ([A-Za-z_][A-Za-z0-9_]*)=['\"]?(.*?)['\"]?$", path.read_text(), re.M))
    environ = {**os.environ, **values}
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%a"], env=environ, capture_output=True, text=True, timeout=20)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        pytest.skip("no dev cluster: sinfo is missing or did not answer within 20 s (run `make cluster-up`)")
    if proc.returncode != 0 or "up" not in proc.stdout.split():
        pytest.skip(f"no dev cluster answering at {environ.get('SLURM_CONF')}: {proc.stderr.strip()!r}")
    # the tiny demo model is built once here, not by two jobs at the same time
    from kolora.core.config import load_config
    from kolora.models.kolors import ensure_model

    ensure_model(load_config(DEMO).model)
    return environ


@pytest.fixture
def cancel_leftovers(env: dict[str, str]):
    """A failing test must not leave its jobs in the queue for the next one."""
    yield
    from slurmkit import _submitted, kolora

    while _submitted:
        runs, name = _submitted.pop()
        kolora(env, "cancel", name, "--runs-dir", runs, timeout=60)


def pytest_collection_modifyitems(config, items) -> None:
    """The preemption tests first. Their time-limit case sizes Slurm's time limit from a reference training it
    measures just before, so both must run under the same load: make test runs the other tests beside the Slurm
    tests (tests/run_split.sh), and those end first."""
    items.sort(key=lambda item: item.path.name != "test_preemption.py")  # stable: otherwise in collection order


# ---- make test / CI: the Slurm tests must have run ---------------------------------------------------------
_skipped_slurm: list[str] = []


def pytest_runtest_logreport(report) -> None:
    if report.skipped and "slurm" in report.keywords:
        _skipped_slurm.append(report.nodeid)


def pytest_terminal_summary(terminalreporter) -> None:
    if _skipped_slurm and os.environ.get("KOLORA_REQUIRE_SLURM") == "1":
        terminalreporter.section("Slurm tests skipped", red=True)
        terminalreporter.line(f"{len(_skipped_slurm)} tests that need the dev cluster were skipped, which "
                              "KOLORA_REQUIRE_SLURM=1 (set by `make test`) does not allow: "
                              + ", ".join(_skipped_slurm[:5]) + (" ..." if len(_skipped_slurm) > 5 else ""))


def pytest_sessionfinish(session, exitstatus) -> None:
    if _skipped_slurm and os.environ.get("KOLORA_REQUIRE_SLURM") == "1" and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def stage_context(stage: str, cfg, run, **placement):
    """What the runner hands a stage's entry point (its work key included), for tests that call one directly."""
    from kolora.core.stage import StageContext
    from kolora.pipeline.keys import Keys

    return StageContext(cfg, run, Keys(cfg, run).work(stage), **placement)


@pytest.fixture
def offline(monkeypatch):
    """No network at all: any connection attempt fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")

    real = socket.socket.connect

    def refuse(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"network access attempted: {address}")
        return real(sock, address)  # local sockets (multiprocessing) are fine

    monkeypatch.setattr(socket.socket, "connect", refuse)
