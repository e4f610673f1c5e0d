"""`validate`, `submit --dry-run`, `run` and `sweep` refuse, before anything is written, what a stage (or sbatch)
would fail on later: a model folder missing its weights, a cache.dir that cannot be written, seeds out of range,
prompts a one-line grid caption cannot hold, arrays over the cluster's MaxArraySize, partitions the cluster does
not have, sweeps whose variants would be one run. Repeated (prompt, seed) pairs are a warning. Slurm is faked:
`sinfo`/`scontrol` scripts on PATH (or none at all)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from conftest import DEMO, PROMPTS, REPO, run_cli, tree_state

LOCAL = str(REPO / "slurm" / "clusters" / "local.yaml")

MAX_SEED = 2**63 - 1  # kolora.core.schema.MAX_SEED (spelled out: the table runs against code without it too)

# Fake Slurm clients: a cluster with partitions cpu and gpu (the default, starred) and MaxArraySize 10.
FAKE_SLURM = {
    "sinfo": 'printf "cpu\\ngpu*\\n"',
    "scontrol": 'if [ "$1 $2" = "show config" ]; then printf "Configuration data as of now\\n'
                'MaxArraySize            = 10\\nMaxJobCount             = 10000\\n"; else exit 1; fi',
}


def _safetensors(path: Path, size: int = 4) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"w": np.zeros(size, np.float32)}, str(path))


def _model(root: Path, unet_weights: bool = True) -> Path:
    """A diffusers-layout folder with every file a stage loads (headers sound, tensors made up)."""
    for part in ("unet", "vae", "text_encoder"):
        (root / part).mkdir(parents=True)
        (root / part / "config.json").write_text("{}")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "KolorsPipeline"}))
    if unet_weights:
        _safetensors(root / "unet" / "diffusion_pytorch_model.safetensors")
    _safetensors(root / "vae" / "diffusion_pytorch_model.safetensors")
    _safetensors(root / "text_encoder" / "model.safetensors")
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "tokenizer.model").write_bytes(b"sentencepiece")
    return root


def _prompts(path: Path, items: list[dict]) -> None:
    path.write_text(yaml.safe_dump({"prompts": items}, allow_unicode=True))


def _profile(path: Path, **render) -> None:
    jobs = {"filter": {"partition": "cpu"}, "train": {"partition": "gpu", "gpus": 1},
            "render": {"partition": "gpu", "gpus": 1, **render}, "grid": {"partition": "cpu"}}
    path.write_text(yaml.safe_dump({"name": path.stem, "defaults": {"time": 30}, "jobs": jobs}))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    w = tmp_path_factory.mktemp("validate")
    raw = yaml.safe_load(DEMO.read_text())
    raw["model"]["path"] = str(w / "model-not-built")  # tiny: built on first run, so the checks skip it
    raw["render"]["prompts"] = str(PROMPTS)
    (w / "good.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True))

    _model(w / "models" / "nounet", unet_weights=False)
    vae = _model(w / "models" / "short-vae") / "vae" / "diffusion_pytorch_model.safetensors"
    vae.write_bytes(vae.read_bytes()[:-8])  # a download cut short: the header names more bytes than there are

    (w / "afile").write_text("not a folder\n")
    (w / "readonly").mkdir()
    (w / "readonly").chmod(0o555)

    p = w / "prompts"
    p.mkdir()
    _prompts(p / "seed-2p63.yaml", [{"prompt": "a cat", "seed": 1}, {"prompt": "a dog", "seed": MAX_SEED + 1}])
    _prompts(p / "seed-negative.yaml", [{"prompt": "a cat", "seed": -1}])
    _prompts(p / "newline.yaml", [{"prompt": "a cat", "seed": 1}, {"prompt": "a cat\non a mat", "seed": 2}])
    _prompts(p / "tab.yaml", [{"prompt": "a cat\ton a mat", "seed": 1}])
    _prompts(p / "repeated.yaml", [{"prompt": "a cat", "seed": 1}, {"prompt": "a dog", "seed": 1},
                                   {"prompt": "a cat", "seed": 1}])
    _prompts(p / "twelve.yaml", [{"prompt": f"a cat #{i}", "seed": i} for i in range(12)])
    _prompts(p / "many.yaml", [{"prompt": "a cat", "seed": i} for i in range(1002)])

    profiles = w / "profiles"
    profiles.mkdir()
    _profile(profiles / "tile-per-task.yaml", tiles_per_task=1)
    _profile(profiles / "a100.yaml")
    a100 = yaml.safe_load((profiles / "a100.yaml").read_text())
    a100["jobs"]["train"]["partition"] = "gpu-a100"
    (profiles / "a100.yaml").write_text(yaml.safe_dump(a100))
    (profiles / "batch.yaml").write_text(yaml.safe_dump({"name": "batch", "defaults": {"partition": "batch"},
                                                         "jobs": {"train": {"partition": "gpu"},
                                                                  "render": {"partition": "gpu"}}}))

    (w / "runs").mkdir()
    (w / "no-slurm").mkdir()  # a PATH without any Slurm client
    fake = w / "fake-slurm"
    fake.mkdir()
    for name, body in FAKE_SLURM.items():
        (fake / name).write_text(f"#!/bin/sh\n{body}\n")
        (fake / name).chmod(0o755)
    return w


G = "{W}/good.yaml"
NOUNET = "model.path={W}/models/nounet"
WEIGHTS = ["model.path", "{W}/models/nounet", "unet/diffusion_pytorch_model.safetensors", "kolora check models"]

# (id, argv, PATH folder, exit code, what the output must name); {W} is the folder above
CASES = [
    # model files: a diffusers folder without its UNet weights passed every check before the stage loading them
    ("model-no-unet-weights-validate", ["validate", G, "--set", NOUNET], "no-slurm", 2, WEIGHTS),
    ("model-no-unet-weights-dry-run", ["submit", G, "--cluster", LOCAL, "--dry-run", "--set", NOUNET],
     "no-slurm", 2, WEIGHTS),
    ("model-no-unet-weights-run", ["run", G, "--set", NOUNET, "--stage", "train", "--runs-dir", "{W}/runs"],
     "no-slurm", 2, WEIGHTS),
    ("model-truncated-vae-validate", ["validate", G, "--set", "model.path={W}/models/short-vae"], "no-slurm", 2,
     ["model.path (vae)", "{W}/models/short-vae", "vae/diffusion_pytorch_model.safetensors", "truncated"]),
    # cache.dir: written by the cache stage, after ingest and filter ran
    ("cache-dir-a-file", ["validate", G, "--set", "cache.dir={W}/afile"], "no-slurm", 2,
     ["cache.dir", "{W}/afile is a file"]),
    ("cache-dir-inside-a-file", ["run", G, "--set", "cache.dir={W}/afile/cache", "--runs-dir", "{W}/runs"],
     "no-slurm", 2, ["cache.dir", "{W}/afile is a file", "{W}/afile/cache cannot be made"]),
    ("cache-dir-read-only", ["run", G, "--set", "cache.dir={W}/readonly", "--runs-dir", "{W}/runs"], "no-slurm", 2,
     ["cache.dir", "{W}/readonly is not writable"]),
    # seeds: 0 .. 2^63 - 1, in the prompt set and in every seed field of the config
    ("prompt-seed-over-2p63", ["validate", G, "--set", "render.prompts={W}/prompts/seed-2p63.yaml"], "no-slurm", 2,
     ["render.prompts", "{W}/prompts/seed-2p63.yaml", "prompts[1].seed", "2^63 - 1", str(MAX_SEED + 1)]),
    ("prompt-seed-negative-run", ["run", G, "--set", "render.prompts={W}/prompts/seed-negative.yaml",
                                  "--runs-dir", "{W}/runs"], "no-slurm", 2,
     ["render.prompts", "{W}/prompts/seed-negative.yaml", "prompts[0].seed", "from 0"]),
    ("config-train-seed-over-2p63", ["validate", G, "--set", f"train.seed={MAX_SEED + 1}"], "no-slurm", 2,
     ["train.seed", "2^63 - 1"]),
    ("config-validation-seed-negative", ["submit", G, "--cluster", LOCAL, "--dry-run", "--set",
                                         "train.validation.seeds=[0,-5]"], "no-slurm", 2,
     ["train.validation.seeds[1]", "from 0", "(got -5)"]),
    # prompts a one-line caption cannot hold
    ("caption-newline", ["validate", G, "--set", "render.prompts={W}/prompts/newline.yaml", "--set",
                         "grid.captions=prompt"], "no-slurm", 2,
     ["grid.captions", "{W}/prompts/newline.yaml", "prompt #2", "a newline '\\n'", "grid.captions: seed"]),
    ("caption-tab-dry-run", ["submit", G, "--cluster", LOCAL, "--dry-run", "--set",
                             "render.prompts={W}/prompts/tab.yaml", "--set", "grid.captions=prompt"], "no-slurm", 2,
     ["grid.captions", "{W}/prompts/tab.yaml", "prompt #1", "a tab '\\t'"]),
    # arrays over MaxArraySize: Slurm's answer, else its default 1001
    ("render-array-over-max-array-size", ["submit", G, "--cluster", "{W}/profiles/tile-per-task.yaml", "--dry-run",
                                          "--set", "render.prompts={W}/prompts/twelve.yaml", "--set", "grid.rows=6"],
     "fake-slurm", 2, ["jobs.render.tiles_per_task", "{W}/profiles/tile-per-task.yaml", "12 tasks",
                       "MaxArraySize 10", "to 2 or more"]),
    ("render-array-over-default-1001", ["validate", G, "--cluster", "{W}/profiles/tile-per-task.yaml", "--set",
                                        "render.prompts={W}/prompts/many.yaml", "--set", "grid.rows=501"],
     "no-slurm", 2, ["jobs.render.tiles_per_task", "1002 tasks", "MaxArraySize 1001", "Slurm's default",
                     "to 2 or more"]),
    ("filter-array-over-max-array-size", ["submit", G, "--cluster", LOCAL, "--dry-run", "--set", "filter.shards=11"],
     "fake-slurm", 2, ["filter.shards", "11 tasks", "MaxArraySize 10", "at most 10 shards"]),
    # partitions sinfo does not list
    ("partition-missing-validate", ["validate", G, "--cluster", "{W}/profiles/a100.yaml"], "fake-slurm", 2,
     ["jobs.train.partition", "{W}/profiles/a100.yaml", "'gpu-a100'", "cpu, gpu"]),
    ("default-partition-missing-dry-run", ["submit", G, "--cluster", "{W}/profiles/batch.yaml", "--dry-run"],
     "fake-slurm", 2, ["defaults.partition", "{W}/profiles/batch.yaml", "'batch'", "jobs filter, grid"]),
    # sweeps whose variants would be one run
    ("sweep-values-equal-once-read", ["sweep", G, "--vary", "train.lr=1e-3,0.001", "--cluster", LOCAL],
     "no-slurm", 2, ["--vary train.lr=1e-3,0.001", "1e-3 and 0.001 are the same train.lr", "give each value once"]),
    ("sweep-operational-field", ["sweep", G, "--vary", "train.num_workers=0,2", "--cluster", LOCAL], "no-slurm", 2,
     ["--vary train.num_workers", "changes no output", "data loader processes"]),
    ("sweep-experiment-seed", ["sweep", G, "--vary", "seed=1,2", "--cluster", LOCAL], "no-slurm", 2,
     ["--vary seed", "changes no output", "vary train.seed"]),
    # a warning, not an error
    ("repeated-prompt-and-seed-warns", ["validate", G, "--set", "render.prompts={W}/prompts/repeated.yaml"],
     "no-slurm", 0, ["warning", "{W}/prompts/repeated.yaml", "prompts #1 and #3", "same prompt and seed"]),
]


def _fill(text: str, world: Path) -> str:
    return text.replace("{W}", str(world))


@pytest.mark.parametrize("argv, path, code, names", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_caught_before_anything_is_written(world, argv, path, code, names, capsys, monkeypatch):
    monkeypatch.chdir(world)
    monkeypatch.setenv("KOLORA_RUNS", str(world / "runs"))
    monkeypatch.setenv("PATH", str(world / path))
    if "{W}/readonly" in " ".join(argv) and os.geteuid() == 0:
        # root writes a 0555 folder anyway; os.access is the kernel's answer for this user, so it is made to
        # give a non-root user's answer here (as a non-root user the real chmod'ed folder is refused)
        real_access = os.access
        readonly = str(world / "readonly")
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == readonly and mode & os.W_OK
                            else real_access(p, mode, **kw))
    before = tree_state(world)
    rc = run_cli([_fill(a, world) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "internal error" not in err, err
    assert rc == code, out + err
    for name in names:
        assert _fill(name, world) in out + err, out + err
    assert tree_state(world) == before, "a refused command wrote or deleted something"


def test_a_cluster_that_has_everything_passes(world, capsys, monkeypatch):
    """The starred default partition is a partition; 4 render tasks fit MaxArraySize 10; with no Slurm client
    answering, partitions are not checked."""
    for path in ("fake-slurm", "no-slurm"):
        monkeypatch.setenv("PATH", str(world / path))
        assert run_cli(["validate", str(world / "good.yaml"), "--cluster", LOCAL]) == 0, capsys.readouterr().err
        assert run_cli(["submit", str(world / "good.yaml"), "--cluster", LOCAL, "--dry-run", "--runs-dir",
                     str(world / "runs")]) == 0
    assert "warning" not in capsys.readouterr().err


def test_a_caption_limit_only_with_prompt_captions(world, capsys):
    """Without prompt captions, a newline in a prompt is the text encoder's business, not the grid's."""
    assert run_cli(["validate", str(world / "good.yaml"), "--set",
                 f"render.prompts={world / 'prompts' / 'newline.yaml'}"]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("layout", ["diffusers", "diffsynth"])
def test_model_check_passes_a_complete_model(layout, tiny_diffusers, tiny_diffsynth):
    from kolora.core.config import ModelConfig
    from kolora.models.kolors import check_files, tiny_diffsynth_overrides

    path = tiny_diffusers if layout == "diffusers" else tiny_diffsynth
    extra = tiny_diffsynth_overrides(path) if layout == "diffsynth" else {}
    files = check_files(ModelConfig(layout=layout, path=path, **extra))
    assert files.unet.exists()


def test_the_largest_seed_trains():
    """train.seed up to 2^63 - 1: the sample order's generator seed wraps like torch's own (2^64) instead of
    overflowing."""
    from kolora.train.samples import StepSampler

    assert sorted(StepSampler(4, 4, MAX_SEED)) == [0, 1, 2, 3]
    assert list(StepSampler(4, 8, 7)) == list(StepSampler(4, 8, 7))
