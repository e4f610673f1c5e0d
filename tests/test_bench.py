"""Smoke checks of bench/: each script runs, ends with a parseable RESULT line, and its numbers are plausible.

The real runs (2,000-image filter bench, full flops with backward counts, demo cold/warm, GPU benches) are
minutes long and are run by hand (`.venv/bin/python bench/<name>.py`, `bash bench/run_gpu.sh`); here the small
variants run with --no-record, so bench/RESULTS.md is never touched by tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"


def run_bench(name: str, *args: str, env: dict[str, str] | None = None, timeout: float = 600
              ) -> tuple[str, dict[str, str]]:
    res = subprocess.run([sys.executable, str(BENCH / f"{name}.py"), *args], capture_output=True, text=True,
                         cwd=REPO, timeout=timeout, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    assert lines[-1].startswith(f"RESULT {name} "), lines[-5:]
    values = dict(kv.split("=", 1) for kv in lines[-1].split()[2:])
    return res.stdout, values


def test_common_formats_tables_and_result_lines() -> None:
    sys.path.insert(0, str(BENCH))
    try:
        import _common
    finally:
        sys.path.remove(str(BENCH))
    assert _common.result_line("x", {"a": 1, "b": 0.123456, "c": True, "d": 12345.678, "e": "H100_SXM"}) == \
        "RESULT x a=1 b=0.1235 c=true d=12346 e=H100_SXM"
    with pytest.raises(ValueError, match="one word"):
        _common.result_line("x", {"gpu": "NVIDIA H100"})
    assert _common.table(["a", "bb"], [[1.5, "x"]]).splitlines() == ["| a     | bb |", "|-------|----|",
                                                                      "| 1.500 | x  |"]
    assert _common.gpu_peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert _common.gpu_peak_tflops("NVIDIA H100 PCIe") == 756
    assert _common.gpu_peak_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert _common.gpu_peak_tflops("Something Else") is None


def test_results_file_gets_one_dated_row_per_run(tmp_path: Path, monkeypatch, capsys) -> None:
    sys.path.insert(0, str(BENCH))
    try:
        import _common
    finally:
        sys.path.remove(str(BENCH))
    results = tmp_path / "RESULTS.md"
    monkeypatch.setattr(_common, "RESULTS", results)
    monkeypatch.setattr(_common, "REPO", tmp_path)
    env = {"date": "2026-01-02 03:04 UTC", "host": "node7", "cpu": "Xeon (8 usable cores)", "gpu": "NVIDIA H100",
           "kolora": "abc1234"}
    _common.report("alpha", "first", env, "| a |\n|---|\n| 1 |", {"x": 1, "y": 2.5})
    _common.report("beta", "second", {**env, "date": "2026-01-03 00:00 UTC", "gpu": "not used"}, "body", {"z": 3})
    _common.report("alpha", "not kept", env, "body", {"x": 9}, record=False)
    text = results.read_text(encoding="utf-8")
    assert text.startswith(_common.RESULTS_HEADER)
    rows = [r for r in text.split("<!-- end of runs -->")[0].splitlines() if r.startswith("| 2026")]
    assert len(rows) == 2
    assert rows[0].split("|")[1:6] == [" 2026-01-02 03:04 UTC ", " alpha     ", " node7, Xeon (8 usable cores) ",
                                       " NVIDIA H100 ", " abc1234 "] and "`x=1 y=2.500`" in rows[0]
    assert "2026-01-03 00:00 UTC" in rows[1] and "`z=3`" in rows[1] and "not used" in rows[1]
    assert text.count("## alpha: first") == 1 and text.count("## beta: second") == 1 and "not kept" not in text
    assert text.rstrip().endswith("RESULT beta z=3\n```")
    _common.record_section(results, "")  # regenerating changes nothing (no blank lines pile up)
    assert results.read_text(encoding="utf-8") == text
    assert "\n\n\n" not in text


def test_flops_quick_unet_forward_is_in_the_expected_range() -> None:
    """Kolors UNet forward at 1024² ≈ 7 TFLOP (SDXL's blocks with 256 tokens of context; SDXL itself ≈ 6.8)."""
    out, v = run_bench("flops", "--quick", timeout=300)
    assert v["quick"] == "true" and v["resolution"] == "1024"
    unet, sdxl = float(v["unet_fwd_tflop"]), float(v["sdxl_unet_fwd_tflop"])
    assert 6.0 < unet < 8.0 and 5.5 < sdxl < unet
    assert 2.7 < float(v["text_encoder_tflop"]) < 3.3  # ≈ 2 × 5.7 B non-embedding params × 256 tokens
    assert 3.0 < float(v["vae_encode_tflop"]) < 7.0 and float(v["vae_decode_tflop"]) > float(v["vae_encode_tflop"])
    assert float(v["render_tflop"]) > 100 * unet
    # the docstring's hand estimates: parameters × tokens for ChatGLM3, layer-by-layer for the UNet (within 2×)
    assert 0.95 < float(v["text_encoder_vs_pencil"]) < 1.05
    assert 0.5 < float(v["unet_fwd_vs_pencil"]) < 2.0


@pytest.mark.slow
def test_flops_full_training_counts_and_hook_cross_check() -> None:
    """~1 min: forward + backward on the meta device, with and without gradient checkpointing."""
    _, v = run_bench("flops", "--no-record", timeout=900)
    fwd, train, ckpt = (float(v[k]) for k in ("unet_fwd_tflop", "unet_train_tflop", "unet_train_ckpt_tflop"))
    assert 1.8 < train / fwd < 2.5  # frozen base: input gradients only
    assert 0.5 < (ckpt - train) / fwd <= 1.0  # checkpointing recomputes (most of) one forward
    assert float(v["hook_check_max_dev"]) < 0.01
    assert float(v["tutorial_step_tflop"]) == pytest.approx(
        float(v["text_encoder_tflop"]) + float(v["vae_encode_tflop"]) + ckpt, rel=1e-3)


def test_filter_bench_small(tmp_path: Path) -> None:
    """50 images: both op sets through Data-Juicer keep the same samples as the sizes say."""
    out, v = run_bench("filter", "--count", "50", "--repeats", "1", "--no-record", "--no-warmup",
                       "--data-dir", str(tmp_path / "images"))
    assert v["same_kept"] == "true" and v["same_stats"] == "true" and v["kept"] == v["expected_kept"]
    assert int(v["kept"]) > 0 and v["count"] == "50"
    assert float(v["header_img_s"]) > 10 * float(v["load_image_img_s"])
    assert "| kolora header ops" in out
    assert v["verify_rejected"] == "0" and float(v["verify_img_s"]) > 0 and float(v["stage_vs_builtin"]) > 0
    assert "decode verification (kolora.filter.decode" in out


@pytest.mark.parametrize("name", ["gpu_train", "gpu_render"])
def test_gpu_benches_skip_cleanly_without_cuda(name: str) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available: the GPU benches would really run")
    out, v = run_bench(name, timeout=300)
    assert "skipped: no CUDA" in out and v == {"skipped": "no-cuda"}


def test_gpu_train_tiny_runs_every_configuration_on_cpu() -> None:
    """The GPU script's own code paths (LoRA, autocast + GradScaler, encoders every step, checkpointing) on tiny
    models, so a lent GPU finds it working."""
    out, v = run_bench("gpu_train", "--tiny", "--steps", "1", "--warmup", "1", "--no-record", timeout=600)
    assert v["tiny"] == "true"
    for key in ("kolora_bf16_ckpt", "kolora_bf16", "kolora_fp16_ckpt", "kolora_fp16", "tutorial_fp16_ckpt",
                "tutorial_fp16"):
        assert float(v[f"{key}_steps_s"]) > 0, key
    for key in ("kolora_bf16_ckpt", "kolora_bf16", "kolora_fp16_ckpt", "kolora_fp16"):  # the planner's estimate
        assert 0 < float(v[f"{key}_planned_gib"]) < 0.01, key
    assert "TINY MODELS" in out and "planned GiB" in out


def test_cache_size_bench_reports_bytes_per_entry_at_kolors_size() -> None:
    out, v = run_bench("cache_size", "--no-record", timeout=300)
    assert int(v["text_16-mixed_bytes"]) < 2 * 2**20 + 16 * 2**10 < 4 * 2**20 < int(v["text_32_bytes"])
    assert int(v["text_16-mixed_8tok_bytes"]) < 100 * 2**10 and "GiB for 10,000" in out


def test_gpu_render_tiny_runs_on_cpu() -> None:
    out, v = run_bench("gpu_render", "--tiny", "--images", "1", "--no-record", timeout=600)
    assert float(v["fp16_lora_s_per_image"]) > 0 and float(v["bf16_lora_s_per_image"]) > 0


def test_submit_bench_skips_without_a_cluster(tmp_path: Path) -> None:
    env: dict[str, Any] = {**os.environ, "SLURM_CONF": str(tmp_path / "no-slurm.conf"),
                           "KOLORA_DEVCLUSTER": str(tmp_path / "no-devcluster")}
    out, v = run_bench("submit", "--no-record", env=env, timeout=120)
    assert out.startswith("skipped: ") and v["skipped"] in {"no-slurm", "cluster-down", "no-submit"}


@pytest.mark.slurm
def test_submit_bench_on_the_dev_cluster() -> None:
    """Needs `make cluster-up`: one submission of the demo graph, cancelled once its first job runs."""
    out, v = run_bench("submit", "--repeats", "1", "--no-record", timeout=300)
    if "skipped" in v:
        pytest.skip(out.splitlines()[0])
    assert 0 < float(v["submit_s"]) < 60 and 0 < float(v["first_running_s"]) < 120


def _rewheel(dist: str, dest: Path) -> Path:
    """A wheel of an installed distribution, zipped from its installed files (what `pip download` would bring
    for this Python, without a network)."""
    import zipfile
    from importlib import metadata

    d = metadata.distribution(dist)
    tag = next(line.split(": ", 1)[1] for line in (d.read_text("WHEEL") or "").splitlines() if line.startswith("Tag: "))
    name = d.metadata["Name"].replace("-", "_")
    out = dest / f"{name}-{d.version}-{tag}.whl"
    root = Path(d.locate_file(""))
    with zipfile.ZipFile(out, "w") as z:
        for f in d.files or []:
            path = root / f
            if path.is_file() and not str(f).startswith("..") and "__pycache__" not in str(f):
                z.write(path, str(f))
    return out


def test_run_gpu_installs_missing_packages_from_the_wheel_folder(tmp_path: Path) -> None:
    """A GPU image without diffusers and pydantic (hidden here by modules that fail to import) and no network:
    run_gpu.sh installs them from the wheel folder and imports the real ones."""
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    for mod in ("diffusers", "pydantic"):
        (hidden / f"{mod}.py").write_text(f"raise ImportError('{mod} is not installed on this image')\n")
    env = {**os.environ, "PYTHONPATH": str(hidden), "PIP_NO_INDEX": "1", "PY": sys.executable,
           "KOLORA_BENCH_WHEELS": str(tmp_path / "empty")}
    cmd = ["bash", str(BENCH / "run_gpu.sh"), "--check"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert res.returncode == 1 and "has no wheels" in res.stderr and "make bench-wheels" in res.stderr

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for dist in ("diffusers", "pydantic", "pydantic_core", "annotated-types", "typing-inspection",
                 "importlib_metadata"):
        _rewheel(dist, wheels)
    env["KOLORA_BENCH_WHEELS"] = str(wheels)
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    import diffusers

    assert "installing 6 wheels" in res.stdout and f"diffusers {diffusers.__version__}" in res.stdout


def test_gpu_wheel_list_is_pinned_by_the_constraints() -> None:
    names = [ln.strip() for ln in (BENCH / "gpu-wheels.txt").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    pinned = {ln.split("==")[0].lower().replace("_", "-") for ln in (REPO / "constraints.txt").read_text().splitlines()
              if "==" in ln}
    assert names and all(n.lower().replace("_", "-") in pinned for n in names)
