"""Shared fixtures: tiny Kolors models (both layouts) built once per session, and one demo run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "configs" / "demo.yaml"
PROMPTS = REPO / "configs" / "prompts" / "anime-story.yaml"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_diffusers(tmp_path_factory) -> Path:
    from kolora.models import build_tiny

    return build_tiny(tmp_path_factory.mktemp("models") / "tiny-diffusers", layout="diffusers")


@pytest.fixture(scope="session")
def tiny_diffsynth(tmp_path_factory) -> Path:
    from kolora.models import build_tiny

    return build_tiny(tmp_path_factory.mktemp("models") / "tiny-diffsynth", layout="diffsynth")


def demo_overrides(model_path: Path, *extra: str) -> list[str]:
    return [f"model.path={model_path}", *extra]


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, tiny_diffusers):
    """`kolora run configs/demo.yaml` once (in process), shared by the tests that only read its outputs."""
    from kolora.cli import main

    runs = tmp_path_factory.mktemp("runs")
    rc = main(["run", str(DEMO), "--runs-dir", str(runs), "--set", f"model.path={tiny_diffusers}"])
    assert rc == 0
    return runs / "demo"
