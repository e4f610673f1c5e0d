"""The stage registry: what makes each stage rerun, what never does, and that GPU work is never thrown away."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import typing
from pathlib import Path

import pytest
from conftest import DEMO, PROMPTS, REPO
from pydantic import BaseModel

from kolora.cli.main import main
from kolora.core.config import ExperimentConfig, load_config
from kolora.core.rundir import RunDir
from kolora.pipeline.keys import Keys
from kolora.pipeline.registry import NAMES, OPERATIONAL, STAGES, rerun_table

LORA = Path("lora") / "pytorch_lora_weights.safetensors"

# A changed value for every operational field (the test below checks this covers all of them).
OPERATIONAL_CHANGES = {
    "name": "demo", "seed": 7, "model.tiny": False, "filter.np": 2, "filter.executor": "ray",
    "filter.fast_ops": False, "filter.shards": 3, "filter.shard_size": 5, "cache.batch_size": 3, "cache.device": "cpu", "cache.dir": "/tmp/kolora-lab-cache",
    "train.checkpoint_every": 7, "train.checkpoint_minutes": 5, "train.keep_checkpoints": 2,
    "train.num_workers": 2, "train.accelerator": "cpu", "render.device": "cpu",
    "scorers.tiny": False, "evaluate.device": "cpu",
    "train.validation.every": 10, "train.validation.prompts": "[a lighthouse]", "train.validation.count": 1,
    "train.validation.seeds": "[3, 4]", "train.validation.steps": 5, "train.validation.size": 32,
    "train.wandb": "kolora-lab",
}


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _copy(demo_run: Path, tmp_path: Path) -> Path:
    runs = tmp_path / "runs"
    shutil.copytree(demo_run, runs / "demo")
    return runs


def _run(runs: Path, model: Path, *sets: str, stages: tuple[str, ...] = (), name: str | None = None) -> int:
    args = ["run", str(DEMO), "--runs-dir", str(runs), "--set", f"model.path={model}"]
    for s in sets:
        args += ["--set", s]
    for s in stages:
        args += ["--stage", s]
    return main(args + (["--name", name] if name else []))


def _summary(run: Path, stage: str) -> dict:
    return json.loads((run / "manifest.json").read_text())["stages"][stage]["summary"]


def _leaves(model: type[BaseModel], prefix: str = "") -> set[str]:
    out = set()
    for name, field in model.model_fields.items():
        sub = [a for a in (field.annotation, *typing.get_args(field.annotation))
               if isinstance(a, type) and issubclass(a, BaseModel)]
        out |= _leaves(sub[0], f"{prefix}{name}.") if sub else {prefix + name}
    return out


def _downstream(first: str) -> list[str]:
    """`first` and every stage that reads its output, directly or not, in pipeline order."""
    reached = {first}
    for s in STAGES:
        if set(s.after) & reached:
            reached.add(s.name)
    return [n for n in NAMES if n in reached]


# ---- the registry ------------------------------------------------------------------------------------------
def test_every_config_field_is_an_input_of_some_stage_or_operational():
    used = {f for s in STAGES for f in (*s.inputs, *s.content, *s.continues)}
    assert not used & OPERATIONAL.keys()
    assert _leaves(ExperimentConfig) == used | OPERATIONAL.keys()
    assert set(OPERATIONAL_CHANGES) == set(OPERATIONAL)


@pytest.mark.parametrize("field", sorted(OPERATIONAL_CHANGES))
def test_an_operational_field_changes_no_stage_key(demo_run, tiny_diffusers, field):
    run = RunDir(demo_run)
    base = load_config(DEMO, [f"model.path={tiny_diffusers}"])
    changed = load_config(DEMO, [f"model.path={tiny_diffusers}", f"{field}={OPERATIONAL_CHANGES[field]}"])
    assert [Keys(base, run).output(s) for s in NAMES] == [Keys(changed, run).output(s) for s in NAMES]


@pytest.mark.parametrize(("field", "value", "first"), [
    ("train.lr", 0.002, "train"), ("train.rank", 8, "train"), ("train.steps", 45, "train"),
    ("cache.max_sequence_length", 40, "cache"), ("train.resolution", 72, "cache"), ("filter.ops", "[]", "filter"),
    ("data.synthetic.count", 20, "ingest"), ("render.cfg", 5, "render"), ("grid.columns", 4, "grid"),
])
def test_an_input_changes_its_stage_and_what_follows_only(demo_run, tiny_diffusers, field, value, first):
    run = RunDir(demo_run)
    base = load_config(DEMO, [f"model.path={tiny_diffusers}"])
    changed = load_config(DEMO, [f"model.path={tiny_diffusers}", f"{field}={value}"])
    differs = [s for s in NAMES if Keys(base, run).output(s) != Keys(changed, run).output(s)]
    assert differs[0] == first
    if first in ("render", "grid", "evaluate", "report"):
        assert differs == _downstream(first)
    # render is keyed by its LoRA's bytes: an upstream change reaches it when the new LoRA exists
    assert set(differs) >= set(NAMES[NAMES.index(first):NAMES.index("train") + 1]) - {"render", "grid"}


def test_no_stage_key_holds_a_path(demo_run, tiny_diffusers):
    cfg = load_config(DEMO, [f"model.path={tiny_diffusers}"])
    inputs = json.dumps([Keys(cfg, RunDir(demo_run)).inputs(s) for s in NAMES], ensure_ascii=False)
    assert str(tiny_diffusers) not in inputs and str(REPO) not in inputs


def test_readme_has_the_registrys_rerun_table():
    readme = (REPO / "README.md").read_text()
    assert rerun_table() in readme, "README's 'what reruns when' table differs from kolora.pipeline.registry.rerun_table()"


# ---- through `kolora run` ----------------------------------------------------------------------------------
def test_operational_changes_rerun_nothing(demo_run, tiny_diffusers, tmp_path, capsys):
    runs = _copy(demo_run, tmp_path)
    lora = _sha(runs / "demo" / LORA)
    sets = [f"{f}={v}" for f, v in OPERATIONAL_CHANGES.items() if f != "name"]  # another name: another run
    assert _run(runs, tiny_diffusers, *sets) == 0
    err = capsys.readouterr().err
    assert err.count("complete, skipped") == len(NAMES), err
    assert _sha(runs / "demo" / LORA) == lora


def test_new_lr_keeps_the_cache_and_sets_the_old_training_aside(demo_run, tiny_diffusers, tmp_path, capsys,
                                                                monkeypatch):
    from kolora.cache import stage as cache
    from kolora.models import kolors as models
    def must_not_run(*a, **k):
        raise AssertionError("the cache stage re-read an image or loaded an encoder")

    for mod, name in ((cache, "load_image_tensor"), (models, "load_text_encoder"), (models, "load_vae")):
        monkeypatch.setattr(mod, name, must_not_run)
    runs = _copy(demo_run, tmp_path)
    run = runs / "demo"
    old_lora = _sha(run / LORA)
    assert _run(runs, tiny_diffusers, "train.lr=0.002", stages=("cache", "train")) == 0
    err = capsys.readouterr().err
    assert "cache   complete, skipped" in err and "train   done" in err
    (aside,) = (run / "superseded").glob("train-*")
    assert re.search(rf"moved\s+to\s+superseded/{aside.name}/", err), err
    assert _sha(aside / LORA) == old_lora
    assert sorted(p.name for p in (aside / "train" / "checkpoints").iterdir()) == [
        "step=000010.ckpt", "step=000020.ckpt", "step=000030.ckpt"]
    assert _summary(run, "train")["resumed_from_step"] == 0 and _sha(run / LORA) != old_lora

    # Back to the first lr: its training comes back from superseded/ and nothing is trained again.
    assert _run(runs, tiny_diffusers, stages=("cache", "train")) == 0
    assert "continuing the outputs made earlier" in capsys.readouterr().err
    assert _sha(run / LORA) == old_lora and _summary(run, "train")["resumed_from_step"] == 30


def test_force_discards_the_training(demo_run, tiny_diffusers, tmp_path, capsys):
    runs = _copy(demo_run, tmp_path)
    assert main(["run", str(DEMO), "--runs-dir", str(runs), "--set", f"model.path={tiny_diffusers}",
                 "--stage", "train", "--force"]) == 0
    assert "--force: discarded train/, lora/" in capsys.readouterr().err
    assert _summary(runs / "demo", "train")["resumed_from_step"] == 0
    assert not (runs / "demo" / "superseded").exists()


def test_raising_steps_continues_and_matches_a_run_with_those_steps_from_the_start(demo_run, tiny_diffusers,
                                                                                  tmp_path, capsys):
    runs = _copy(demo_run, tmp_path)
    run = runs / "demo"
    assert _run(runs, tiny_diffusers, "train.steps=45") == 0
    assert "cache   complete, skipped" in capsys.readouterr().err
    assert _summary(run, "train")["resumed_from_step"] == 30
    fresh = tmp_path / "fresh"
    assert _run(fresh, tiny_diffusers, "train.steps=45") == 0
    assert _summary(fresh / "demo", "train")["resumed_from_step"] == 0
    assert _sha(run / LORA) == _sha(fresh / "demo" / LORA)


def test_lowering_steps_says_what_it_does_and_keeps_the_later_checkpoints(demo_run, tiny_diffusers, tmp_path,
                                                                          caplog):
    runs = _copy(demo_run, tmp_path)
    run = runs / "demo"
    original = _sha(run / LORA)
    with caplog.at_level("WARNING", logger="kolora.train.loop"):
        assert _run(runs, tiny_diffusers, "train.steps=20", stages=("train",)) == 0
    assert "train.steps=20 is below the newest checkpoint (step 30)" in caplog.text
    assert "the LoRA is the step-20 state from its checkpoint" in caplog.text
    assert _summary(run, "train")["resumed_from_step"] == 20
    assert (run / "train" / "checkpoints" / "step=000030.ckpt").is_file()
    assert _run(runs, tiny_diffusers, stages=("train",)) == 0  # back to 30: from the kept checkpoint
    assert _summary(run, "train")["resumed_from_step"] == 30 and _sha(run / LORA) == original


def test_a_copied_model_folder_reruns_nothing(demo_run, tiny_diffusers, tmp_path, capsys):
    runs = _copy(demo_run, tmp_path)
    elsewhere = tmp_path / "lab-models" / "kolors-copy"
    shutil.copytree(tiny_diffusers, elsewhere)
    assert _run(runs, elsewhere) == 0
    assert capsys.readouterr().err.count("complete, skipped") == len(NAMES)


def test_one_edited_prompt_rerenders_exactly_its_tile(demo_run, tiny_diffusers, tmp_path, capsys):
    runs = _copy(demo_run, tmp_path)
    run = runs / "demo"
    prompts = tmp_path / "my-prompts.yaml"
    shutil.copyfile(PROMPTS, prompts)
    assert _run(runs, tiny_diffusers, f"render.prompts={prompts}") == 0  # same bytes elsewhere: nothing reruns
    assert capsys.readouterr().err.count("complete, skipped") == len(NAMES)
    tiles = {p.name: p.stat().st_mtime_ns for p in (run / "render").glob("*.png")}
    grid = _sha(run / "grid.png")

    text = prompts.read_text()
    fourth = re.findall(r'- prompt: "([^"]+)"', text)[3]
    prompts.write_text(text.replace(fourth, "星空," + fourth, 1))  # at the front: within the 32 tokens the demo reads
    assert _run(runs, tiny_diffusers, f"render.prompts={prompts}") == 0
    summary = _summary(run, "render")
    # its LoRA tile and its base-model tile (the demo evaluates)
    assert (summary["rendered"], summary["already_done"], summary["stale_removed"]) == (2, 14, 2)
    now = {p.name: p.stat().st_mtime_ns for p in (run / "render").glob("*.png")}
    (gone,) = set(tiles) - set(now)
    (new,) = set(now) - set(tiles)
    assert gone.startswith("003-5-") and new.startswith("003-5-")
    assert {k: v for k, v in now.items() if k != new} == {k: v for k, v in tiles.items() if k != gone}
    assert _sha(run / "grid.png") != grid


def test_runs_sharing_a_cache_dir_encode_each_sample_once(tiny_diffusers, tmp_path, capsys):
    shared = tmp_path / "lab-cache"
    upto_cache = ("ingest", "filter", "cache")
    assert _run(tmp_path / "runs", tiny_diffusers, f"cache.dir={shared}", stages=upto_cache, name="lr-a") == 0
    first = _summary(tmp_path / "runs" / "lr-a", "cache")
    assert first["encoded"] > 0 and first["reused"] == 0
    assert _run(tmp_path / "runs", tiny_diffusers, f"cache.dir={shared}", "train.lr=0.003",
                stages=(*upto_cache, "train"), name="lr-b") == 0
    second = _summary(tmp_path / "runs" / "lr-b", "cache")
    assert (second["encoded"], second["reused"]) == (0, first["encoded"])
    assert second["samples"] == first["samples"]
    assert not (tmp_path / "runs" / "lr-b" / "cache" / "latents").exists()  # entries live in the shared store
    capsys.readouterr()


def test_two_runs_filling_one_cache_dir_at_once(tiny_diffusers, tmp_path):
    """Two jobs (a sweep) encode into one shared store at the same time: atomic renames of identical bytes,
    both caches complete and every entry readable."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    shared = tmp_path / "lab-cache"
    cmd = [sys.executable, "-m", "kolora.cli.main", "run", str(DEMO), "--runs-dir", str(tmp_path / "runs"),
           "--set", f"model.path={tiny_diffusers}", "--set", f"cache.dir={shared}",
           "--stage", "ingest", "--stage", "filter", "--stage", "cache"]
    procs = [subprocess.Popen([*cmd, "--name", name], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in ("sweep-a", "sweep-b")]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    index = [json.loads((tmp_path / "runs" / n / "cache" / "index.json").read_text()) for n in ("sweep-a", "sweep-b")]
    assert index[0]["entries"] == index[1]["entries"]
    for e in index[0]["entries"]:
        assert set(load_file(str(shared / "text" / f"{e['text_key']}.safetensors"))) == {"prompt_embeds", "pooled"}
        assert set(load_file(str(shared / "latents" / f"{e['latent_key']}.safetensors"))) == {"latents"}
    assert not [p for p in shared.rglob("*") if p.name.startswith(".")]  # no temp file left behind


def test_keys_of_runs_made_before_stay_the_same():
    """A run folder made by an earlier kolora resumes and skips: its stages' keys are computed exactly as then
    (values recorded from kolora 3f4ad0f, before the package layout; a change to configs/demo.yaml's data or
    filter fields changes them too, and then this test's values)."""
    cfg = load_config(DEMO)
    keys = Keys(cfg, RunDir(Path("/nonexistent/run")))
    assert {s: keys.work(s) for s in ("ingest", "filter")} == {"ingest": "67fdbf3b63acc9ab",
                                                               "filter": "dce90bc30b0a6aef"}
    cfg = load_config(DEMO, ["filter.shards=3", "data.limit=5"])
    keys = Keys(cfg, RunDir(Path("/nonexistent/run")))
    assert {s: keys.output(s) for s in ("ingest", "filter")} == {"ingest": "8cf2fe426a9be4cb",
                                                                 "filter": "474d132b98cc0446"}
