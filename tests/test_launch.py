"""The launcher without a cluster: --dry-run, validation before queueing, and the submission flow against
fake Slurm clients (sbatch/squeue/sacct/scancel scripts that record their calls). The real thing runs in
tests/test_launch_slurm.py."""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml

from kolora.cli.main import main
from kolora.launch.jobs import job_environment
from kolora.launch.monitor import _rows
from kolora.launch.supervise import BOOT

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo.yaml")
LOCAL = str(REPO / "slurm" / "clusters" / "local.yaml")

FAKE = {
    # sbatch: keep a copy of the script, answer with the next job id
    "sbatch": 'n=$(( $(cat "$FAKE_SLURM/next" 2>/dev/null || echo 1000) + 1 )); echo $n > "$FAKE_SLURM/next"\n'
              'cp "$1" "$FAKE_SLURM/sbatch.$n.sh"; echo "Submitted batch job $n"',
    "srun": "exit 0",
    "squeue": 'cat "$FAKE_SLURM/squeue.txt" 2>/dev/null; exit 0',
    "sacct": 'cat "$FAKE_SLURM/sacct.txt" 2>/dev/null; exit 0',
    "scancel": 'echo "$@" >> "$FAKE_SLURM/scancel.log"; rm -f "$FAKE_SLURM/squeue.txt"',
}


@pytest.fixture
def fake_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "fake-slurm"
    folder.mkdir()
    for name, body in FAKE.items():
        script = folder / name
        script.write_text("#!/bin/bash\n" + body + "\n")
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}:/usr/bin:/bin")
    monkeypatch.setenv("FAKE_SLURM", str(folder))
    return folder


def sbatch_scripts(fake: Path) -> dict[int, str]:
    return {int(p.name.split(".")[1]): p.read_text() for p in fake.glob("sbatch.*.sh")}


def test_dry_run_shows_every_job(tmp_path: Path, fake_slurm: Path, capsys: pytest.CaptureFixture) -> None:
    runs = tmp_path / "runs"
    assert main(["submit", DEMO, "--cluster", LOCAL, "--runs-dir", str(runs), "--dry-run"]) == 0
    out = capsys.readouterr().out
    table = {line.split()[0]: line.split() for line in out.splitlines()[3:8]}
    assert table["job"][:4] == ["job", "stages", "partition", "time"]
    assert table["filter"][1:4] == ["ingest+filter", "cpu", "0:30:00"] and table["filter"][-1] == "-"
    assert table["train"][1:4] == ["cache+train+select", "gpu", "0:30:00"] and table["train"][-1] == "afterok:filter"
    assert table["render"][-2:] == ["0-3%2", "afterok:train"]
    assert table["grid"][1:4] == ["grid+evaluate+report", "cpu", "0:10:00"] and table["grid"][-1] == "afterok:render"
    sections = dict(re.findall(r"# ---- (\w+): [^\n]*\n(.*?)(?=\n# ---- |\Z)", out, re.S))
    assert set(sections) == {"filter", "train", "render", "grid"}
    expect = {
        "filter": ["--partition=cpu", "--time=30", "--kill-on-invalid-dep=yes"],
        "train": ["--partition=gpu", "--gres=gpu:1", "--dependency=afterok:FILTER_JOB_ID", "--mem=4G"],
        "render": ["--partition=gpu", "--gres=gpu:1", "--array=0-3%2", "--dependency=afterok:TRAIN_JOB_ID"],
        "grid": ["--partition=cpu", "--time=10", "--dependency=afterok:RENDER_JOB_ID"],
    }
    for job, options in expect.items():
        for option in options:
            assert f"#SBATCH {option}\n" in sections[job], (job, option, sections[job])
    assert "gres" not in sections["filter"] and "gres" not in sections["grid"]
    for body in sections.values():  # every job step starts with the stop signals blocked (launch.supervise)
        step = next(line for line in body.splitlines() if line.startswith("srun "))
        assert shlex.split(step)[-10:-4] == [sys.executable, "-S", "-I", "-c", BOOT, sys.executable], step
    assert not runs.exists() and not sbatch_scripts(fake_slurm)  # nothing written, nothing queued


def test_dry_run_multi_gpu_training(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    profile = yaml.safe_load(Path(LOCAL).read_text())
    profile["jobs"]["train"].update(gpus=4, nodes=2, gpu_type="a100", gpu_option="gpus-per-node")
    profile["setup"] = ["module load cuda/12.4"]
    path = tmp_path / "multi.yaml"
    path.write_text(yaml.safe_dump(profile))
    assert main(["submit", DEMO, "--cluster", str(path), "--runs-dir", str(tmp_path), "--dry-run"]) == 0
    train = capsys.readouterr().out.split("# ---- train")[1].split("# ---- render")[0]
    for option in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=a100:4"):
        assert f"#SBATCH {option}\n" in train
    assert "\nmodule load cuda/12.4\n" in train
    assert "srun --unbuffered" in train and "--kill-on-bad-exit=1" in train


@pytest.mark.parametrize("args, message", [
    (["--set", "render.prompts=does-not-exist.yaml"], "render.prompts"),
    (["--set", "data.source=folder", "--set", "data.path=/no/such/dataset"], "data.path"),
    (["--set", "filter.ops=[{no_such_filter: {}}]"], "filter.ops"),
    (["--set", "train.steps=0"], "train.steps"),
])
def test_nothing_is_queued_when_validation_fails(tmp_path: Path, fake_slurm: Path, capsys, args, message) -> None:
    runs = tmp_path / "runs"
    assert main(["submit", DEMO, "--cluster", LOCAL, "--runs-dir", str(runs), *args]) == 2
    assert message in capsys.readouterr().err
    assert not runs.exists() and not sbatch_scripts(fake_slurm)


def test_bad_profile_queues_nothing(tmp_path: Path, fake_slurm: Path, capsys) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\njobs: {render: {array_throttle: 0}}\n")
    assert main(["submit", DEMO, "--cluster", str(path), "--runs-dir", str(tmp_path / "runs")]) == 2
    assert "jobs.render.array_throttle" in capsys.readouterr().err
    assert not sbatch_scripts(fake_slurm)


def test_submit_queues_the_graph_and_records_it(tmp_path: Path, fake_slurm: Path, capsys) -> None:
    runs = tmp_path / "runs"
    assert main(["submit", DEMO, "--cluster", LOCAL, "--runs-dir", str(runs), "--name", "g"]) == 0
    printed = capsys.readouterr().out
    scripts = sbatch_scripts(fake_slurm)
    assert sorted(scripts) == [1001, 1002, 1003, 1004]
    assert "--dependency" not in scripts[1001]
    assert "#SBATCH --dependency=afterok:1001\n" in scripts[1002]
    assert "#SBATCH --dependency=afterok:1002\n" in scripts[1003] and "#SBATCH --array=0-3%2\n" in scripts[1003]
    assert "#SBATCH --dependency=afterok:1003\n" in scripts[1004]
    assert all("#SBATCH --kill-on-invalid-dep=yes\n" in s for s in scripts.values())
    assert all("#SBATCH --requeue\n" in s for s in scripts.values())  # also where JobRequeue=0 is the default
    assert "1003_[0-3%2]" in printed

    manifest = json.loads((runs / "g" / "manifest.json").read_text())
    slurm = manifest["slurm"]
    assert slurm["jobs"] == {"filter": "1001", "train": "1002", "render": "1003", "grid": "1004"}
    sub = slurm["submissions"][slurm["latest"]]
    folder = Path(sub["folder"])
    assert folder.parent == runs / "g" / "slurm" and (folder / "config.yaml").is_file()
    assert sub["jobs"]["render"]["task_ids"] == [f"1003_{i}" for i in range(4)]
    assert sub["jobs"]["render"]["tiles"] == 8 and sub["jobs"]["render"]["throttle"] == 2
    assert (folder / "1001_submitted.pkl").is_file() and (folder / "1003_2_submitted.pkl").is_file()

    # a second submission while jobs of the run are queued is refused, and queues nothing
    (fake_slurm / "squeue.txt").write_text("1002|PENDING|gpu|Dependency\n")
    assert main(["submit", DEMO, "--cluster", LOCAL, "--runs-dir", str(runs), "--name", "g"]) == 1
    assert "still has jobs in the queue (1002)" in capsys.readouterr().err
    assert len(sbatch_scripts(fake_slurm)) == 4

    # status: Slurm's states + the run directory; a failed filter names the stage and its log
    (fake_slurm / "squeue.txt").unlink()
    (fake_slurm / "sacct.txt").write_text(
        "1001|FAILED|cpu|1:0|||||\n1002|CANCELLED by 0|gpu|0:0|||||\n1003_[0-3%2]|CANCELLED by 0|gpu|0:0|||||\n"
        "1004|CANCELLED by 0|cpu|0:0|||||\n")
    with (runs / "g" / "manifest.json").open() as f:
        m = json.load(f)
    m["stages"] = {"ingest": {"status": "complete"}, "filter": {"status": "failed", "error": "FilterError: boom"}}
    (runs / "g" / "manifest.json").write_text(json.dumps(m))
    assert main(["status", "g", "--runs-dir", str(runs)]) == 1
    out = capsys.readouterr().out
    assert "FAILED: stage filter (job 1001, FAILED): FilterError: boom" in out
    assert f"log: {folder / '1001_0_log.err'}" in out
    assert re.search(r"render\s+render\s+1003_\[0-3\]\s+CANCELLED", out)

    # cancel: scancel for what squeue still lists
    (fake_slurm / "squeue.txt").write_text("1004|PENDING|cpu|Dependency\n")
    assert main(["cancel", "g", "--runs-dir", str(runs)]) == 0
    assert (fake_slurm / "scancel.log").read_text().split() == ["1004"]
    assert "cancelled 1004" in capsys.readouterr().out


def test_job_environment_is_offline(tmp_path: Path) -> None:
    env = job_environment(tmp_path / "run", extra={"HF_HUB_OFFLINE": "0", "NCCL_DEBUG": "WARN"})
    assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1" and env["MODELSCOPE_OFFLINE"] == "1"
    assert env["HF_HOME"] == str(tmp_path / "run" / ".hf_home") and env["NCCL_DEBUG"] == "WARN"
    env = job_environment(tmp_path / "run", hf_home=tmp_path / "hf", modelscope_cache=tmp_path / "ms")
    assert env["HF_HOME"] == str(tmp_path / "hf") and env["MODELSCOPE_CACHE"] == str(tmp_path / "ms")


def test_folded_array_rows_are_expanded() -> None:
    rows = _rows("7_[2-4%2]|PENDING|gpu\n7_0|RUNNING|gpu\n8|CANCELLED by 0|cpu\n", ["JobID", "State", "Partition"])
    assert [(r["JobID"], r["State"], r["base"]) for r in rows] == [
        ("7_2", "PENDING", "7"), ("7_3", "PENDING", "7"), ("7_4", "PENDING", "7"), ("7_0", "RUNNING", "7"),
        ("8", "CANCELLED", "8")]


def test_dry_run_with_a_container_runs_every_stage_through_apptainer(tmp_path: Path, capsys) -> None:
    image = tmp_path / "images" / "kolora.sif"
    image.parent.mkdir()
    image.write_bytes(b"SIF")
    data = tmp_path / "datasets" / "anime"
    data.mkdir(parents=True)
    (data / "metadata.csv").write_text("file_name,text\n0.png,a cat\n")  # submit checks the dataset's header
    profile = yaml.safe_load(Path(LOCAL).read_text())
    profile["container"] = {"image": str(image), "binds": ["/scratch-does-not-need-to-exist:/scratch"],
                            "nv": True}
    path = tmp_path / "with-container.yaml"
    path.write_text(yaml.safe_dump(profile))
    runs = tmp_path / "runs"
    (runs / "demo").mkdir(parents=True)  # bind roots are existing folders (a tiny model is built later)
    model = tmp_path / "models" / "tiny"
    model.parent.mkdir()
    assert main(["submit", DEMO, "--cluster", str(path), "--runs-dir", str(runs), "--dry-run",
                 "--set", f"model.path={model}", "--set", "data.source=folder", "--set", f"data.path={data}"]) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("# stage process: ")]
    assert len(lines) == 4  # filter, train, render, grid
    for line in lines:
        argv = shlex.split(line.removeprefix("# stage process: "))
        assert argv[:4] == ["apptainer", "exec", "--nv", "--cleanenv"]
        binds = [argv[i + 1] for i, a in enumerate(argv) if a == "--bind"]
        run_dir = str(runs / "demo")
        for needed in (run_dir, str(data), str(model.parent), str(REPO / "configs" / "prompts")):
            assert f"{needed}:{needed}" in binds, (needed, binds)
        assert "/scratch-does-not-need-to-exist:/scratch" in binds
        assert argv[argv.index("--pwd") + 1] == run_dir
        assert "HF_HUB_OFFLINE=1" in [argv[i + 1] for i, a in enumerate(argv) if a == "--env"]
        i = argv.index(str(image))
        assert argv[i + 1:i + 4] == ["python", "-m", "kolora.launch.child"]
    assert list((runs / "demo").iterdir()) == []  # a dry run writes nothing


def short_profile(tmp_path: Path, train_minutes: int, lead_s: int) -> Path:
    profile = yaml.safe_load(Path(LOCAL).read_text())
    profile["signal_lead_s"] = lead_s
    profile["jobs"]["train"]["time"] = train_minutes
    path = tmp_path / f"short-{train_minutes}.yaml"
    path.write_text(yaml.safe_dump(profile))
    return path


def test_a_time_limit_too_short_to_load_the_models_is_flagged_before_queueing(
        tmp_path: Path, tiny_diffusers: Path, capsys: pytest.CaptureFixture) -> None:
    import shutil

    from kolora.core.config import load_config
    from kolora.launch.cluster import load_profile
    from kolora.launch.plan import attempt_window_warnings

    model = tmp_path / "model"
    shutil.copytree(tiny_diffusers, model)
    with open(model / "unet" / "padding.safetensors", "wb") as f:  # a UNet the size of Kolors' fp16 one (sparse)
        f.truncate(5_200_000_000)
    cfg = load_config(DEMO, [f"model.path={model}"])
    assert attempt_window_warnings(cfg, load_profile(LOCAL)) == []  # 30 min: plenty
    [hopeless] = attempt_window_warnings(cfg, load_profile(short_profile(tmp_path, 2, 60)))
    assert hopeless.startswith("jobs.train: time 2 min − signal_lead_s 60 s leaves 60 s per attempt; starting and "
                               "loading 5.2 GB of weights takes about 86 s, so an attempt is stopped before its "
                               "first checkpoint. Raise jobs.train.time"), hopeless
    [tight] = attempt_window_warnings(cfg, load_profile(short_profile(tmp_path, 3, 60)))
    assert "leaves 120 s per attempt" in tight and "most of each attempt goes to start-up" in tight

    # validate --cluster and submit say it before anything is queued
    assert main(["validate", DEMO, "--set", f"model.path={model}", "--cluster",
                 str(short_profile(tmp_path, 2, 60))]) == 0
    assert "kolora: warning: jobs.train: time 2 min" in capsys.readouterr().err
    assert main(["validate", DEMO, "--set", f"model.path={model}", "--cluster", LOCAL]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main(["submit", DEMO, "--set", f"model.path={model}", "--cluster", str(short_profile(tmp_path, 2, 60)),
                 "--runs-dir", str(tmp_path / "runs"), "--dry-run"]) == 0
    assert "kolora: warning: jobs.train" in capsys.readouterr().err


@pytest.mark.parametrize("required", [True, False])
def test_make_test_fails_when_a_slurm_test_was_skipped(tmp_path: Path, required: bool) -> None:
    """`make test` sets KOLORA_REQUIRE_SLURM=1: a Slurm test skipped for want of a cluster fails the run."""
    import os
    import subprocess

    env = {**os.environ, "KOLORA_DEVCLUSTER": str(tmp_path / "no-cluster")}
    env.pop("KOLORA_REQUIRE_SLURM", None)
    if required:
        env["KOLORA_REQUIRE_SLURM"] = "1"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={tmp_path / 't'}",
                           str(REPO / "tests" / "test_launch_slurm.py"), "-k", "cancel_empties"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert "1 skipped" in proc.stdout, proc.stdout[-2000:]
    if required:
        assert proc.returncode == 1 and "Slurm tests skipped" in proc.stdout, proc.stdout[-2000:]
    else:
        assert proc.returncode == 0, proc.stdout[-2000:]
