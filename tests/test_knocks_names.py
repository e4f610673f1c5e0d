"""Run and sweep names are one namespace under the runs dir (issue #24, item 5): every command that makes or
continues a run or a sweep (run, submit, resume, sweep in process and on Slurm) refuses a name whose folder is
something else, names the folder and the fix, and leaves the runs dir as it was (an earlier sweep's sweep.json
and variants intact). And the smaller ones (item 8): status and the sweep ranking after lowering train.steps,
retraining from step 0 said before it happens, import-lora's render.lora hint, data.path of synthetic data,
`kolora check dataset` on a run folder."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import DEMO, PROMPTS, tree_state
from test_launch import LOCAL, fake_slurm  # noqa: F401 - fake_slurm is a fixture

from kolora.cli.main import main


def _demo(**changes) -> dict:
    raw = yaml.safe_load(DEMO.read_text())
    raw["render"]["prompts"] = str(PROMPTS)
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        raw[section][key] = value
    return raw


TINY: list[str] = []  # the tiny model's folder, for {T}


def _bind(runs: Path, config: Path, name: str, *overrides: str) -> None:
    from kolora.core.config import load_config
    from kolora.core.rundir import RunDir

    RunDir(runs / name).bind(load_config(config, list(overrides), name=name))


@pytest.fixture(scope="module")
def world(tmp_path_factory, demo_run, tiny_diffusers) -> Path:
    """A runs dir with a run, a sweep, someone's folder, a run re-run with a lower train.steps and a sweep whose
    variants were; configs, a container profile, a folder of LoRA files. (demo_run: 30 steps, checkpoints at
    10, 20 and 30.)"""
    from kolora.core.rundir import RunDir
    from kolora.sweep.plan import plan, write_manifest

    w = tmp_path_factory.mktemp("names")
    TINY.append(str(tiny_diffusers))
    (w / "good.yaml").write_text(yaml.safe_dump(_demo(model__path=str(w / "model-not-built")), allow_unicode=True))
    # demo_run's config: its stages are complete for it
    (w / "demo.yaml").write_text(yaml.safe_dump(_demo(model__path=str(tiny_diffusers)), allow_unicode=True))
    runs = w / "runs"
    _bind(runs, w / "good.yaml", "solo")
    sweep = plan(w / "good.yaml", ["train.lr=1e-3,3e-3"], runs, name="sw")
    write_manifest(sweep, launcher="in-process")
    for v in sweep.variants:
        RunDir(v.root(sweep.dir)).bind(v.cfg)
    (runs / "notes").mkdir()
    (runs / "notes" / "todo.txt").write_text("someone's folder\n")

    # 30 trained steps, then re-run with train.steps=20: the LoRA is the step-20 checkpoint's
    shutil.copytree(demo_run, runs / "lowered")
    assert main(["run", str(w / "demo.yaml"), "--name", "lowered", "--runs-dir", str(runs), "--set",
                 "train.steps=20", "--stage", "train"]) == 0

    # a sweep whose variant a was trained to step 6 (loss 0.1 there) and re-run to step 3 (loss 0.5); b has 0.3
    ranked = runs / "ranked"
    for name, losses in (("a", [0.9, 0.7, 0.5, 0.3, 0.2, 0.1]), ("b", [0.9, 0.6, 0.3])):
        _bind(ranked, w / "demo.yaml", name, "train.steps=3")  # demo.yaml's model exists: status builds none
        (ranked / name / "train").mkdir()
        (ranked / name / "train" / "metrics.csv").write_text(
            "step,loss,lr,time\n" + "".join(f"{i},{x},0.001,0\n" for i, x in enumerate(losses, 1)))
    (ranked / "sweep.json").write_text(json.dumps({"name": "ranked", "vary": {"train.lr": [1, 2]}, "variants": [
        {"name": n, "overrides": {"train.lr": i}, "run_dir": n} for i, n in enumerate("ab", 1)]}))

    profile = yaml.safe_load(Path(LOCAL).read_text())
    profile["container"] = {"image": str(w / "kolora.sif")}
    (w / "container.yaml").write_text(yaml.safe_dump(profile))
    (w / "adapters").mkdir()  # a folder of LoRA files: import-lora's hint must name the file, not the folder
    shutil.copy(demo_run / "lora" / "pytorch_lora_weights.safetensors", w / "adapters" / "other.safetensors")
    (w / "empty-bin").mkdir()
    return w


def _copy_trained(w: Path, name: str, drop_checkpoints: bool = False) -> None:
    shutil.copytree(w / "runs" / "lowered", w / "runs" / name)
    if drop_checkpoints:
        shutil.rmtree(w / "runs" / name / "train" / "checkpoints")


def _loss_at(run: Path, step: int) -> str:
    row = next(r for r in (run / "train" / "metrics.csv").read_text().splitlines()[1:] if r.split(",")[0] == str(step))
    return f"{float(row.split(',')[1]):.4g}"


NO_MODEL = ["--set", "model.tiny=false"]  # a sweep that got past the name would stop at preflight, not train
SLURM_SWEEP = ["--cluster", LOCAL]

# (id, argv, exit code, what the output must name, whether the runs dir may change); {W} is the world folder
CASES = [
    # ---- item 5: a run, a submission, a sweep or a resume into a folder of another kind
    ("run-named-like-a-sweep", ["run", "{W}/good.yaml", "--name", "sw", "--stage", "ingest"], 2,
     ["{W}/runs/sw", "sweep sw", "sweep.json", "lr-1e-3", "another --name"], False),
    ("run-inside-a-sweep-folder", ["run", "{W}/good.yaml", "--runs-dir", "{W}/runs/sw", "--name", "fresh",
                                   "--stage", "ingest"], 2,
     ["--runs-dir {W}/runs/sw", "sweep sw", "fresh", "--runs-dir {W}/runs"], False),
    ("run-inside-a-run-folder", ["run", "{W}/good.yaml", "--runs-dir", "{W}/runs/solo", "--name", "lora",
                                 "--stage", "ingest"], 2, ["--runs-dir {W}/runs/solo", "run solo"], False),
    ("run-into-someones-folder", ["run", "{W}/good.yaml", "--name", "notes", "--stage", "ingest"], 2,
     ["{W}/runs/notes", "todo.txt", "another --name"], False),
    ("submit-named-like-a-sweep", ["submit", "{W}/good.yaml", "--cluster", LOCAL, "--dry-run", "--name", "sw"], 2,
     ["{W}/runs/sw", "sweep sw", "another --name"], False),
    ("submit-inside-a-sweep-folder", ["submit", "{W}/good.yaml", "--cluster", LOCAL, "--dry-run", "--runs-dir",
                                      "{W}/runs/sw", "--name", "fresh"], 2, ["--runs-dir {W}/runs/sw", "sweep sw"],
     False),
    ("submit-into-someones-folder", ["submit", "{W}/good.yaml", "--cluster", LOCAL, "--name", "notes"], 2,
     ["{W}/runs/notes", "todo.txt"], False),
    ("sweep-named-like-a-run-slurm", ["sweep", "{W}/good.yaml", "--name", "solo", "--vary", "train.lr=1e-3,3e-3",
                                      *SLURM_SWEEP], 2, ["{W}/runs/solo", "run solo", "another --name"], False),
    ("sweep-named-like-a-run-in-process", ["sweep", "{W}/good.yaml", "--name", "solo", "--vary",
                                           "train.lr=1e-3,3e-3", *NO_MODEL], 2, ["{W}/runs/solo", "run solo"], False),
    ("sweep-other-vary-slurm", ["sweep", "{W}/good.yaml", "--name", "sw", "--vary", "train.rank=4,8", *SLURM_SWEEP],
     2, ["{W}/runs/sw/sweep.json", "train.lr=1e-3,3e-3", "lr-1e-3, lr-3e-3", "--force", "another --name"], False),
    ("sweep-other-vary-in-process", ["sweep", "{W}/good.yaml", "--name", "sw", "--vary", "train.rank=4,8",
                                     *NO_MODEL], 2, ["{W}/runs/sw/sweep.json", "--force"], False),
    ("sweep-one-more-value", ["sweep", "{W}/good.yaml", "--name", "sw", "--vary", "train.lr=1e-3,3e-3,1e-2",
                              *SLURM_SWEEP], 2, ["{W}/runs/sw/sweep.json", "lr-1e-3, lr-3e-3", "--force"], False),
    ("sweep-inside-a-sweep-folder", ["sweep", "{W}/good.yaml", "--runs-dir", "{W}/runs/sw", "--vary",
                                     "train.rank=4,8", *SLURM_SWEEP], 2, ["--runs-dir {W}/runs/sw", "sweep sw"],
     False),
    ("sweep-into-someones-folder", ["sweep", "{W}/good.yaml", "--name", "notes", "--vary", "train.rank=4,8",
                                    *SLURM_SWEEP], 2, ["{W}/runs/notes", "todo.txt"], False),
    ("resume-a-sweep", ["resume", "sw", "--cluster", LOCAL], 2, ["{W}/runs/sw", "sweep sw", "sw/lr-1e-3",
                                                                "sw/lr-3e-3"], False),
    # ---- item 8
    ("status-after-lowering-steps", ["status", "lowered"], 0, ["step 20/20, loss {L20}", "final loss {L20} (step 20)"],
     False),
    ("sweep-ranking-after-lowering-steps", ["status", "ranked"], 0,
     ["best so far (by final training loss (no scores yet)): b: final loss 0.3 (step 3)"], False),
    ("retraining-from-step-0-is-said", ["run", "{W}/demo.yaml", "--name", "raised", "--set", "train.steps=22",
                                        "--stage", "train"], 0,
     ["train.steps=22: no checkpoint", "metrics.csv reaches step 30", "starts again from step 0"], True),
    ("import-lora-hint-names-the-file", ["import-lora", "{W}/runs/lowered/lora/pytorch_lora_weights.safetensors",
                                         "--to", "adapters/mine.safetensors", "--unet-config", "{T}"], 0,
     ["render with it: --set render.lora={W}/adapters/mine.safetensors"], True),
    ("synthetic-data-path-not-bound", ["submit", "{W}/good.yaml", "--cluster", "{W}/container.yaml", "--dry-run",
                                       "--set", "data.path=/nowhere-at-all/data"], 0, ["nothing queued"], False),
    ("synthetic-data-path-not-in-the-digest", ["validate", "{W}/good.yaml", "--set", "data.path={W}/adapters"], 0,
     ["OK (run demo, config {DIGEST})"], False),
    ("synthetic-data-path-not-an-ingest-input", ["run", "{W}/demo.yaml", "--name", "pathed", "--set",
                                                 "data.path={W}/adapters", "--stage", "ingest"], 0,
     ["ingest  complete, skipped"], True),
    ("check-dataset-on-a-run-folder", ["check", "dataset", "{W}/runs/lowered"], 2,
     ["{W}/runs/lowered is a kolora run folder", "kolora check dataset {W}/runs/lowered/trainset/train",
      "kolora status {W}/runs/lowered"], False),
    ("check-dataset-on-a-sweep-folder", ["check", "dataset", "{W}/runs/sw"], 2,
     ["{W}/runs/sw is a kolora sweep folder", "{W}/runs/sw/lr-1e-3/trainset/train"], False),
]

SETUP = {  # what a case needs that the others must not see
    "retraining-from-step-0-is-said": lambda w: _copy_trained(w, "raised", drop_checkpoints=True),
    "synthetic-data-path-not-an-ingest-input": lambda w: _copy_trained(w, "pathed"),
}


def _after(case: str, w: Path, text: str, capsys) -> None:
    """What a case checks beyond its output."""
    if case == "import-lora-hint-names-the-file":  # the hint, applied as printed, validates
        hint = shlex.split(text.split("render with it: ")[1].splitlines()[0])
        capsys.readouterr()
        assert main(["validate", str(w / "demo.yaml"), *hint]) == 0, capsys.readouterr().err
    if case == "status-after-lowering-steps":  # train's own summary too
        summary = json.loads((w / "runs" / "lowered" / "manifest.json").read_text())["stages"]["train"]["summary"]
        assert f"{summary['last_loss']:.4g}" == _loss_at(w / "runs" / "lowered", 20)


def _substitute(text: str, w: Path) -> str:
    if "{L20}" in text:
        text = text.replace("{L20}", _loss_at(w / "runs" / "lowered", 20))
    if "{DIGEST}" in text:
        from kolora.core.config import load_config

        text = text.replace("{DIGEST}", load_config(w / "good.yaml").digest())
    return text.replace("{W}", str(w)).replace("{T}", TINY[-1])


@pytest.mark.parametrize("case, argv, code, names, changes", CASES, ids=[c[0] for c in CASES])
def test_names_and_small_ones(world, case, argv, code, names, changes, capsys, caplog, monkeypatch):
    monkeypatch.chdir(world)
    monkeypatch.setenv("KOLORA_RUNS", str(world / "runs"))
    monkeypatch.setenv("PATH", str(world / "empty-bin"))  # no Slurm client: nothing can be queued
    if case in SETUP:
        SETUP[case](world)
    before = tree_state(world)
    try:
        rc = main([_substitute(a, world) for a in argv])
    except SystemExit as e:
        rc = int(e.code)
    out, err = capsys.readouterr()
    text = out + err + caplog.text
    assert "Traceback" not in text and "internal error" not in text, text
    assert rc == code, text
    for name in names:
        assert _substitute(name, world) in text, text
    if not changes:
        assert tree_state(world) == before, "a refused or read-only command wrote or deleted something"
    _after(case, world, text, capsys)


def test_a_sweep_continues_under_its_name_and_force_replaces_its_plan(tmp_path, tiny_diffusers, fake_slurm,  # noqa: F811
                                                                      capsys):
    """The same variants (in any order) continue the sweep; other ones are refused until --force, which keeps the
    earlier variants' folders and lists them as superseded."""
    config = tmp_path / "good.yaml"
    config.write_text(yaml.safe_dump(_demo(model__path=str(tiny_diffusers)), allow_unicode=True))
    runs = tmp_path / "runs"

    def sweep(vary: str, *more: str) -> int:
        return main(["sweep", str(config), "--name", "s", "--runs-dir", str(runs), "--cluster", LOCAL, "--vary",
                     vary, *more])

    assert sweep("train.lr=1e-3,3e-3") == 0
    assert sweep("train.lr=3e-3,1e-3") == 0  # the same variants: a rerun
    before = tree_state(runs)
    assert sweep("train.rank=4,8") == 2
    assert "--force" in capsys.readouterr().err and tree_state(runs) == before
    assert sweep("train.rank=4,8", "--force") == 0
    manifest = json.loads((runs / "s" / "sweep.json").read_text())
    assert [v["name"] for v in manifest["variants"]] == ["rank-4", "rank-8"]
    assert sorted(v["name"] for v in manifest["superseded"]) == ["lr-1e-3", "lr-3e-3"]
    assert all((runs / "s" / n / "manifest.json").is_file() for n in ("lr-1e-3", "lr-3e-3", "rank-4", "rank-8"))
    capsys.readouterr()
    assert main(["status", "s", "--runs-dir", str(runs)]) == 0
    assert "superseded (an earlier plan replaced with --force" in capsys.readouterr().out
    assert main(["status", "s/lr-1e-3", "--runs-dir", str(runs)]) == 0  # still addressable
    # a variant resumes as a run inside its sweep
    assert main(["resume", "s/rank-8", "--runs-dir", str(runs)]) == 0


def test_a_copied_run_resumes_into_its_own_folder(tmp_path, tiny_diffusers, fake_slurm, capsys):  # noqa: F811
    config = tmp_path / "good.yaml"
    config.write_text(yaml.safe_dump(_demo(model__path=str(tiny_diffusers)), allow_unicode=True))
    runs = tmp_path / "runs"
    _bind(runs, config, "solo")
    shutil.copytree(runs / "solo", runs / "copy")
    before = tree_state(runs / "solo")
    assert main(["resume", "copy", "--runs-dir", str(runs), "--cluster", LOCAL]) == 0
    assert "run copy: queued" in capsys.readouterr().out
    assert json.loads((runs / "copy" / "manifest.json").read_text())["slurm"]["latest"]
    assert tree_state(runs / "solo") == before
