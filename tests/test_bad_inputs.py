"""Bad inputs across every command: one message naming the file and field, the documented exit code (2 input
to fix, 1 run-time failure), no traceback, and nothing written or deleted. Plus: a failed rerun keeps the
previous outputs, and what kolora writes is readable by the group and others under umask 022."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import DEMO, PROMPTS, REPO, run_cli, tree_state

from kolora.cli.main import main

LOCAL = str(REPO / "slurm" / "clusters" / "local.yaml")


def _png(path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(path)


def _safetensors(path: Path, metadata: dict[str, str], keys: list[str]) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    shapes = {"down.weight": (4, 8), "up.weight": (8, 4), "alpha": ()}
    save_file({k: np.zeros(next(s for end, s in shapes.items() if k.endswith(end)), np.float32) for k in keys},
              str(path), metadata=metadata)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Every bad input of the table, side by side in one folder (the table checks none of it changes)."""
    w = tmp_path_factory.mktemp("bad-inputs")
    raw = yaml.safe_load(DEMO.read_text())
    raw["model"]["path"] = str(w / "model-not-built")  # tiny: built on first run, so validate skips it
    raw["render"]["prompts"] = str(PROMPTS)
    (w / "good.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True))
    (w / "latin.yaml").write_bytes(b"name: d\xe9mo\n")
    (w / "list.yaml").write_text("- model\n- data\n")
    (w / "broken.yaml").write_text("train: [1, 2\n")
    (w / "configs").mkdir()
    (w / "configs" / "demo.yaml").write_text("name: x\n")
    (w / "prompts-latin.yaml").write_bytes(b"prompts:\n  - {prompt: caf\xe9, seed: 1}\n")
    (w / "prompts-list.yaml").write_text("- {prompt: a cat, seed: 1}\n")
    (w / "prompts-empty.yaml").write_text("prompts: []\n")
    (w / "afile").write_text("not a folder\n")
    (w / "notamodel").mkdir()

    data = w / "data"
    for name in ("no-meta", "wrong-cols", "latin", "empty", "check"):
        (data / name).mkdir(parents=True)
    _png(data / "no-meta" / "0.png")
    (data / "wrong-cols" / "metadata.csv").write_text("file,caption\n0.png,a cat\n")
    (data / "latin" / "metadata.csv").write_bytes(b"file_name,text\n0.png,caf\xe9\n")
    (data / "empty" / "metadata.csv").write_text("file_name,text\n")
    _png(data / "check" / "good.png")
    (data / "check" / "fake.png").write_text("I am text, not an image\n")
    (data / "check" / "metadata.csv").write_text("file_name,text\ngood.png,a\nfake.png,b\nmissing.png,c\n")
    _png(data / "img.png")
    (data / "bad.parquet").write_text("not parquet\n")
    (data / "latin.jsonl").write_bytes(b'{"text": "caf\xe9", "image": ["0.png"]}\n')
    (data / "empty.jsonl").write_text("\n")

    lora = w / "lora"
    lora.mkdir()
    peft_keys = ["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight",
                 "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora.up.weight"]
    _safetensors(lora / "neg-alpha.safetensors", {"kolora.rank": "4", "kolora.alpha": "-4.0"}, peft_keys)
    _safetensors(lora / "garbage-meta.safetensors", {"kolora.rank": "four", "kolora.alpha": "4"}, peft_keys)
    kohya = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    _safetensors(lora / "zero-alpha-kohya.safetensors", {},
                 [f"{kohya}.lora_down.weight", f"{kohya}.lora_up.weight", f"{kohya}.alpha"])
    (lora / "not-lora.bin").write_text("hello\n")

    profiles = w / "profiles"
    (profiles / "folder").mkdir(parents=True)
    (profiles / "mem.yaml").write_text("defaults: {mem: 16000}\n")
    (profiles / "many.yaml").write_text("defaults: {time: 1}\njobs: {filter: {nodes: 2}, render: {gpus: 2}}\n")
    (profiles / "fields.yaml").write_text("defaults: {cpus: true, mem: lots}\n")
    (profiles / "time.yaml").write_text("defaults: {time: 1.5}\n")

    runs = w / "runs"
    (runs / "noconfig").mkdir(parents=True)
    (runs / "noconfig" / "manifest.json").write_text("{}\n")
    (runs / "corrupt").mkdir()
    (runs / "corrupt" / "config.yaml").write_text(yaml.safe_dump({**raw, "name": "corrupt"}, allow_unicode=True))
    (runs / "corrupt" / "manifest.json").write_text('{"name": "corrupt", "stages": {')
    (runs / "nolora").mkdir()
    (runs / "nolora" / "config.yaml").write_text(yaml.safe_dump({**raw, "name": "nolora"}, allow_unicode=True))
    (w / "empty-bin").mkdir()  # a PATH without Slurm's clients
    return w


# (id, argv, exit code, what the message must name); {W} is the folder above
CASES = [
    # run: config, overrides, prompt set, dataset, run folder
    ("filter-op-args-not-a-mapping", ["run", "{W}/good.yaml", "--set", "filter.ops=[{image_shape_filter: 64}]"], 2,
     ["--set filter.ops=", "filter.ops", "image_shape_filter", "must be a mapping"]),
    ("runs-dir-is-a-file", ["run", "{W}/good.yaml", "--runs-dir", "{W}/afile"], 2, ["--runs-dir", "{W}/afile"]),
    ("config-not-utf8", ["run", "{W}/latin.yaml"], 2, ["{W}/latin.yaml", "UTF-8", "line 1"]),
    ("config-is-a-folder", ["run", "{W}/configs"], 2, ["{W}/configs", "is a folder"]),
    ("config-top-level-list", ["run", "{W}/list.yaml"], 2, ["{W}/list.yaml", "mapping", "found a list"]),
    ("config-not-yaml", ["run", "{W}/broken.yaml"], 2, ["{W}/broken.yaml", "not valid YAML"]),
    ("bool-for-int", ["run", "{W}/good.yaml", "--set", "train.steps=true"], 2,
     ["--set train.steps=true", "train.steps", "must be a number"]),
    ("bool-for-float", ["validate", "{W}/good.yaml", "--set", "train.lr=false"], 2, ["train.lr", "must be a number"]),
    ("unknown-key-did-you-mean", ["run", "{W}/good.yaml", "--set", "train.stpes=3"], 2,
     ["--set train.stpes=3", "train.stpes", "did you mean 'steps'"]),
    ("bad-name", ["run", "{W}/good.yaml", "--name", "bad name"], 2, ["--name bad name", "name:", "letters, digits"]),
    ("precision-16", ["run", "{W}/good.yaml", "--set", "train.precision=16"], 2,
     ["train.precision", "'16-mixed'", "(got 16)"]),
    ("prompts-not-utf8", ["run", "{W}/good.yaml", "--set", "render.prompts={W}/prompts-latin.yaml"], 2,
     ["render.prompts", "{W}/prompts-latin.yaml", "UTF-8"]),
    ("prompts-a-list", ["run", "{W}/good.yaml", "--set", "render.prompts={W}/prompts-list.yaml"], 2,
     ["render.prompts", "{W}/prompts-list.yaml", "must be a mapping"]),
    ("prompts-empty", ["run", "{W}/good.yaml", "--set", "render.prompts={W}/prompts-empty.yaml"], 2,
     ["render.prompts", "{W}/prompts-empty.yaml", "prompts:", "at least 1"]),
    ("grid-too-small", ["run", "{W}/good.yaml", "--set", "grid.rows=1"], 2, ["grid.rows", "8 prompts"]),
    ("data-folder-without-metadata", ["run", "{W}/good.yaml", "--set", "data.source=folder", "--set",
                                      "data.path={W}/data/no-meta"], 2, ["data.path", "{W}/data/no-meta", "metadata.csv"]),
    ("metadata-not-utf8", ["run", "{W}/good.yaml", "--set", "data.source=folder", "--set",
                           "data.path={W}/data/latin"], 2, ["{W}/data/latin/metadata.csv", "UTF-8", "line 2"]),
    ("data-path-an-image", ["run", "{W}/good.yaml", "--set", "data.source=folder", "--set",
                            "data.path={W}/data/img.png"], 2, ["data.path", "{W}/data/img.png", "an image"]),
    ("corrupt-manifest-keeps-config", ["run", "{W}/good.yaml", "--name", "corrupt", "--runs-dir", "{W}/runs"], 2,
     ["{W}/runs/corrupt/manifest.json", "not valid JSON"]),
    ("render-lora-negative-alpha", ["run", "{W}/good.yaml", "--set", "render.lora={W}/lora/neg-alpha.safetensors"],
     2, ["render.lora:", "{W}/lora/neg-alpha.safetensors", "alpha -4", "> 0"]),
    # validate
    ("wrong-columns", ["validate", "{W}/good.yaml", "--set", "data.source=folder", "--set",
                       "data.path={W}/data/wrong-cols"], 2, ["{W}/data/wrong-cols/metadata.csv", "file_name,text"]),
    ("empty-metadata", ["validate", "{W}/good.yaml", "--set", "data.source=folder", "--set",
                        "data.path={W}/data/empty"], 2, ["{W}/data/empty", "no usable sample"]),
    ("not-parquet", ["validate", "{W}/good.yaml", "--set", "data.source=parquet", "--set",
                     "data.path={W}/data/bad.parquet"], 2, ["{W}/data/bad.parquet", "not a readable parquet"]),
    ("jsonl-not-utf8", ["validate", "{W}/good.yaml", "--set", "data.source=jsonl", "--set",
                        "data.path={W}/data/latin.jsonl"], 2, ["{W}/data/latin.jsonl", "UTF-8"]),
    ("jsonl-empty", ["validate", "{W}/good.yaml", "--set", "data.source=jsonl", "--set",
                     "data.path={W}/data/empty.jsonl"], 2, ["{W}/data/empty.jsonl", "no usable sample"]),
    ("data-path-missing", ["validate", "{W}/good.yaml", "--set", "data.source=jsonl", "--set",
                           "data.path={W}/data/nowhere.jsonl"], 2, ["data.path", "{W}/data/nowhere.jsonl"]),
    ("render-lora-not-a-lora", ["validate", "{W}/good.yaml", "--set", "render.lora={W}/lora/not-lora.bin"], 2,
     ["render.lora:", "{W}/lora/not-lora.bin", "not a LoRA file"]),
    ("render-lora-kohya-zero-alpha", ["validate", "{W}/good.yaml", "--set",
                                      "render.lora={W}/lora/zero-alpha-kohya.safetensors"], 2,
     ["render.lora:", "{W}/lora/zero-alpha-kohya.safetensors", "alpha"]),
    ("render-lora-garbage-metadata", ["validate", "{W}/good.yaml", "--set",
                                      "render.lora={W}/lora/garbage-meta.safetensors"], 2,
     ["render.lora:", "{W}/lora/garbage-meta.safetensors", "rank/alpha"]),
    ("synthetic-sides-reversed", ["validate", "{W}/good.yaml", "--set", "data.synthetic.min_side=100", "--set",
                                  "data.synthetic.max_side=50"], 2, ["data.synthetic.min_side", "max_side"]),
    ("section-given-a-value", ["validate", "{W}/good.yaml", "--set", "train=5"], 2,
     ["--set train=5", "train: must be a mapping"]),
    ("set-below-a-value", ["validate", "{W}/good.yaml", "--set", "train.steps.x=1"], 2,
     ["--set train.steps.x=1", "train.steps is a value"]),
    ("set-without-value", ["validate", "{W}/good.yaml", "--set", "train.steps"], 2,
     ["--set train.steps", "key.path=value"]),
    ("profile-mem-without-unit", ["validate", "{W}/good.yaml", "--cluster", "{W}/profiles/mem.yaml"], 2,
     ["{W}/profiles/mem.yaml", "defaults.mem", "16000M"]),
    # submit --dry-run
    ("profile-every-problem", ["submit", "{W}/good.yaml", "--cluster", "{W}/profiles/many.yaml", "--dry-run"], 2,
     ["{W}/profiles/many.yaml", "6 problems", "jobs.filter.nodes", "jobs.render.gpus", "jobs.train: time 1 min",
      "jobs.grid: time 1 min"]),
    ("profile-every-field", ["submit", "{W}/good.yaml", "--cluster", "{W}/profiles/fields.yaml", "--dry-run"], 2,
     ["{W}/profiles/fields.yaml", "2 problems", "defaults.cpus: must be a number", "defaults.mem: must be Slurm"]),
    ("profile-time-no-union-tags", ["submit", "{W}/good.yaml", "--cluster", "{W}/profiles/time.yaml", "--dry-run"],
     2, ["{W}/profiles/time.yaml", "defaults.time: must be minutes"]),
    ("profile-is-a-folder", ["submit", "{W}/good.yaml", "--cluster", "{W}/profiles/folder", "--dry-run"], 2,
     ["{W}/profiles/folder", "is a folder"]),
    ("profile-missing", ["submit", "{W}/good.yaml", "--cluster", "{W}/profiles/nowhere.yaml", "--dry-run"], 2,
     ["{W}/profiles/nowhere.yaml", "does not exist"]),
    ("submit-checks-the-dataset", ["submit", "{W}/good.yaml", "--cluster", LOCAL, "--dry-run", "--set",
                                   "data.source=folder", "--set", "data.path={W}/data/wrong-cols"], 2,
     ["{W}/data/wrong-cols/metadata.csv", "file_name,text"]),
    ("submit-without-slurm", ["submit", "{W}/good.yaml", "--cluster", LOCAL, "--runs-dir", "{W}/runs"], 1,
     ["sbatch", "not found on PATH", "login node"]),
    # resume, status, logs
    ("resume-without-config", ["resume", "{W}/runs/noconfig", "--cluster", LOCAL], 2,
     ["{W}/runs/noconfig", "config.yaml"]),
    ("resume-corrupt-manifest", ["resume", "corrupt", "--runs-dir", "{W}/runs", "--cluster", LOCAL], 2,
     ["{W}/runs/corrupt/manifest.json", "not valid JSON"]),
    ("resume-no-such-run", ["resume", "nowhere", "--runs-dir", "{W}/runs"], 2, ["nowhere", "manifest.json"]),
    ("status-corrupt-manifest", ["status", "corrupt", "--runs-dir", "{W}/runs"], 2,
     ["{W}/runs/corrupt/manifest.json", "line 1"]),
    ("status-not-a-run", ["status", "{W}/data"], 2, ["{W}/data", "manifest.json"]),
    ("logs-never-submitted", ["logs", "corrupt", "--runs-dir", "{W}/runs"], 2, ["{W}/runs/corrupt/manifest.json"]),
    # check
    ("check-dataset-every-problem", ["check", "dataset", "{W}/data/check"], 2,
     ["fake.png: not an image", "metadata.csv:4: image {W}/data/check/missing.png does not exist"]),
    ("check-dataset-wrong-columns", ["check", "dataset", "{W}/data/wrong-cols"], 2,
     ["{W}/data/wrong-cols/metadata.csv", "file_name,text"]),
    ("check-dataset-missing", ["check", "dataset", "{W}/nowhere"], 2, ["{W}/nowhere", "does not exist"]),
    ("check-models-not-a-model", ["check", "models", "{W}/notamodel"], 2, ["{W}/notamodel", "no Kolors model"]),
    # LoRA files
    ("import-not-a-lora", ["import-lora", "{W}/lora/not-lora.bin", "--alpha", "4", "--to", "{W}/out"], 2,
     ["{W}/lora/not-lora.bin", "not a LoRA file"]),
    ("import-negative-alpha-file", ["import-lora", "{W}/lora/neg-alpha.safetensors", "--to", "{W}/out"], 2,
     ["{W}/lora/neg-alpha.safetensors", "alpha -4"]),
    ("import-alpha-negative", ["import-lora", "{W}/lora/not-lora.bin", "--alpha", "-4", "--to", "{W}/out"], 2,
     ["--alpha", "-4 must be a number > 0"]),
    ("import-alpha-zero", ["import-lora", "{W}/lora/not-lora.bin", "--alpha", "0", "--to", "{W}/out"], 2,
     ["--alpha", "0 must be a number > 0"]),
    ("import-missing-file", ["import-lora", "{W}/lora/nowhere.ckpt", "--alpha", "4", "--to", "{W}/out"], 2,
     ["{W}/lora/nowhere.ckpt", "does not exist"]),
    ("export-untrained-run", ["export", "{W}/runs/nolora", "--format", "kohya"], 2,
     ["{W}/runs/nolora/lora/pytorch_lora_weights.safetensors", "train the run first"]),
    ("export-no-such-run", ["export", "nowhere", "--runs-dir", "{W}/runs", "--format", "peft"], 2,
     ["nowhere", "{W}/runs"]),
    # models, downloads
    ("make-tiny-over-a-file", ["make-tiny", "{W}/afile"], 2, ["{W}/afile", "not a tiny model"]),
    ("make-tiny-over-a-dataset", ["make-tiny", "{W}/data/no-meta"], 2, ["{W}/data/no-meta", "give a new path"]),
    ("fetch-dataset-without-id", ["fetch", "dataset", "--to", "{W}/ds"], 2, ["dataset id"]),
]


@pytest.mark.parametrize("argv, code, names", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_message_and_changes_nothing(world, argv, code, names, capsys, monkeypatch):
    monkeypatch.chdir(world)
    monkeypatch.setenv("KOLORA_RUNS", str(world / "runs"))
    monkeypatch.setenv("PATH", str(world / "empty-bin"))  # no Slurm client: nothing can be queued
    before = tree_state(world)
    rc = run_cli([a.replace("{W}", str(world)) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "internal error" not in err, err
    assert rc == code, out + err
    for name in names:
        assert name.replace("{W}", str(world)) in out + err, out + err
    assert "Config" not in err and "PromptSet" not in err  # no internal class names
    assert err.count("(got ") <= err.count("\n") and "(got true) (got" not in err
    assert tree_state(world) == before, "a bad input wrote or deleted something"


@pytest.mark.parametrize("case", ["filter-op-args-not-a-mapping", "resume-without-config", "runs-dir-is-a-file"])
def test_no_traceback_in_a_real_process(world, case):
    _, argv, code, names = next(c for c in CASES if c[0] == case)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-m", "kolora.cli.main", *[a.replace("{W}", str(world)) for a in argv]],
                          capture_output=True, text=True, cwd=world, env=env, timeout=120)
    assert proc.returncode == code and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("kolora: "), proc.stderr


def test_verbose_shows_the_traceback(world, capsys):
    assert main(["-v", "validate", str(world / "good.yaml"), "--set", "train.steps=true"]) == 2
    assert "Traceback" in capsys.readouterr().err
    assert main(["validate", str(world / "good.yaml"), "--set", "train.steps=true", "-v"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_a_bug_says_it_is_one(world, capsys, monkeypatch):
    import kolora.pipeline.runner

    monkeypatch.setattr(kolora.pipeline.runner, "preflight", lambda cfg: {}["boom"])
    assert main(["validate", str(world / "good.yaml")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError" in err and "bug in kolora" in err


def test_unquoted_precision_32_is_accepted(world, capsys):
    assert main(["validate", str(world / "good.yaml"), "--set", "train.precision=32"]) == 0
    capsys.readouterr()


def test_failed_rerun_keeps_the_previous_data(world, tmp_path, capsys):
    """A changed data section whose ingest fails leaves data/ and its completion marker as they were."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    runs = tmp_path / "runs"
    good = str(world / "good.yaml")
    assert main(["run", good, "--stage", "ingest", "--runs-dir", str(runs)]) == 0
    run = runs / "demo"
    data_before, marker_before = tree_state(run / "data"), (run / ".complete" / "ingest.json").read_text()
    config_before = (run / "config.yaml").read_text()
    nulls = tmp_path / "nulls.parquet"  # rows, so validate passes, but no image in any: ingest refuses it
    pq.write_table(pa.table({"image": pa.array([None, None], pa.binary()), "text": ["a", "b"]}), nulls)
    capsys.readouterr()
    rc = main(["run", good, "--stage", "ingest", "--runs-dir", str(runs), "--set", "data.source=parquet",
               "--set", f"data.path={nulls}"])
    err = capsys.readouterr().err
    assert rc == 2 and "no usable sample" in err and "previous ingest outputs are back in place" in err, err
    assert tree_state(run / "data") == data_before
    assert (run / ".complete" / "ingest.json").read_text() == marker_before
    assert (run / "config.yaml").read_text() != config_before  # the attempt ran: its config is the frozen one
    assert main(["run", good, "--stage", "ingest", "--runs-dir", str(runs)]) == 0
    assert "ingest  complete, skipped" in capsys.readouterr().err


def test_run_and_exports_are_readable_by_the_group_and_others(tiny_diffusers, tmp_path, capsys):
    """umask 022; kolora run configs/demo.yaml; kolora export ... → 0644 files, 0755 folders."""
    old = os.umask(0o022)
    try:
        runs = tmp_path / "runs"
        assert main(["run", str(DEMO), "--runs-dir", str(runs), "--set", f"model.path={tiny_diffusers}",
                     "--set", "train.steps=2", "--set", "train.checkpoint_every=1", "--set", "render.steps=2"]) == 0
        for fmt in ("peft", "kohya", "diffsynth"):
            assert main(["export", str(runs / "demo"), "--format", fmt]) == 0
        exported = tmp_path / "shared" / "anime.safetensors"
        assert main(["export", str(runs / "demo"), "--format", "kohya", "--to", str(exported)]) == 0
    finally:
        os.umask(old)
    out, err = capsys.readouterr()
    assert "Epoch" not in out + err  # progress is in optimizer steps, not Lightning's "Epoch 0/-2"
    paths = [runs / "demo", *(runs / "demo").rglob("*"), exported]
    assert len(paths) > 50 and any(p.name.endswith(".ckpt") for p in paths)
    closed = [f"{p} {stat.filemode(p.stat().st_mode)}" for p in paths
              if p.stat().st_mode & (0o055 if p.is_dir() else 0o044) != (0o055 if p.is_dir() else 0o044)]
    assert not closed, "\n".join(closed)
    manifest = json.loads((runs / "demo" / "manifest.json").read_text())
    assert manifest["stages"]["train"]["status"] == "complete"
