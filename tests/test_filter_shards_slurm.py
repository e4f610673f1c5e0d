"""filter.shards: 4 on the dev Slurm cluster: the filter job is an array of 4 CPU tasks; one of them killed
(scancel) leaves its shard without a marker and the rest of the graph cancelled; `kolora resume` reruns that
shard only, merges, and the outputs equal an unsharded in-process filter of the same config. Also: the filter job
runs image_nsfw_filter / image_watermark_filter offline on tiny classifiers from scorers.dir."""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import stage_context
from slurmkit import DEMO, kolora, run_progress, sacct, submit, wait_ended, wait_for
from test_filter_classifiers import check_report, classifier_ops, thresholds_for
from test_filter_shards import markers, outputs
from test_ingest_shards import outputs as data_outputs

from kolora.core.config import load_config
from kolora.core.rundir import RunDir
from kolora.filter import shards as filter_shards
from kolora.filter import stage as kfilter
from kolora.ingest import stage as ingest
from kolora.ingest.samples import read_samples
from kolora.models import scorers

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("cancel_leftovers")]


def stage_processes(array_job: str, task: str) -> list[int]:
    """PIDs of the stage process (kolora.launch.child) of one array task (the dev cluster is this machine)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or b"kolora.launch.child" not in (proc / "cmdline").read_bytes():
                continue
            environ = (proc / "environ").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        env = dict(x.split("=", 1) for x in environ if "=" in x)
        if env.get("SLURM_ARRAY_JOB_ID") == array_job and env.get("SLURM_ARRAY_TASK_ID") == task:
            pids.append(int(proc.name))
    return pids


def test_killed_shard_task_is_the_only_one_resume_reruns(env: dict[str, str], tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    sub, _ = submit(env, runs, "shards", "--set", "filter.shards=4")
    run = RunDir(runs / "shards")
    ids = {job: info["job_id"] for job, info in sub["jobs"].items()}
    filt = ids["filter"]
    assert sub["jobs"]["filter"]["array"] and len(sub["jobs"]["filter"]["task_ids"]) == 4
    assert "#SBATCH --array=0-3%4\n" in (Path(sub["folder"]) / f"{filt}_submission.sh").read_text()

    # kill shard task 2 in the middle of its Data-Juicer run: SIGKILL to its stage process (as a node failure
    # or the OOM killer would; scancel's SIGTERM alone the filter, not stoppable, finishes first), then scancel
    victim = f"{filt}_2"
    dj = filter_shards.folder(run, 2, 4) / "dj" / "config.yaml"
    wait_for("shard 2's Data-Juicer run", dj.is_file,
             lambda: (json.dumps(sacct(env, [filt])), run_progress(run.root)), poll_s=0.2)
    assert 2 not in markers(run, 4), "shard 2 finished before it could be killed"
    (pid,) = stage_processes(filt, "2")
    os.kill(pid, signal.SIGKILL)
    subprocess.run(["scancel", victim], env=env, check=True, timeout=30)
    rows = wait_ended(env, list(ids.values()), 4 + 1 + 4 + 1, run.root)
    states = {i: rows[f"{filt}_{i}"]["State"] for i in range(4)}
    assert states[2] in ("CANCELLED", "FAILED") and {states[i] for i in (0, 1, 3)} == {"COMPLETED"}, states
    assert rows[ids["train"]]["State"] == "CANCELLED"  # afterok on the whole array
    first = markers(run, 4)
    assert sorted(first) == [0, 1, 3] and not (run.filter / "report.json").exists()  # nobody merged

    resumed = kolora(env, "resume", "shards", "--runs-dir", runs, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    slurm = json.loads(run.manifest_file.read_text())["slurm"]
    again = slurm["submissions"][slurm["latest"]]
    filt2 = again["jobs"]["filter"]["job_id"]
    rows = wait_ended(env, [filt2], 4, run.root)
    assert {r["State"] for r in rows.values()} == {"COMPLETED"}, rows
    kolora(env, "cancel", "shards", "--runs-dir", runs, timeout=60)  # training is not what is tested here

    second = markers(run, 4)
    assert {i: second[i] == first.get(i) for i in range(4)} == {0: True, 1: True, 2: False, 3: True}
    done2 = json.loads((filter_shards.folder(run, 2, 4) / "done.json").read_text())
    assert done2["slurm_job"] == filt2 and done2["slurm_array_task"] == "2"
    folder = Path(again["folder"])
    logs = {i: (folder / f"{filt2}_{i}_0_log.err").read_text() for i in range(4)}
    for i in range(4):
        assert f"'ran': [{i}]" in logs[i] if i == 2 else "'ran': []" in logs[i], logs[i][-2000:]
    assert "stage ingest (task -): {'skipped': True}" in logs[2]  # ingest was done by the first submission
    manifest = json.loads(run.manifest_file.read_text())
    assert manifest["stages"]["filter"]["status"] == "complete"
    assert json.loads((run.filter / "report.json").read_text())["summary"]["shards"] == 4
    status = json.loads(kolora(env, "status", "shards", "--runs-dir", runs, "--json").stdout)
    detail = {j["job"]: j["detail"] for j in status["jobs"]}["filter"]
    assert (detail["kept"], detail["dropped"]) == (24, 24)
    logs = kolora(env, "logs", "shards", "--runs-dir", runs, "--stage", "filter", "--task", "2", "--stream", "err")
    assert logs.returncode == 0 and "'ran': [2]" in logs.stdout

    # the same config unsharded, in this process
    cfg = load_config(DEMO)
    ref = RunDir(tmp_path / "ref")
    ingest.run(stage_context("ingest", cfg, ref))
    kfilter.run(stage_context("filter", cfg, ref))
    want, got = outputs(ref), outputs(run)
    assert got == want
    assert want["summary"]["kept"] == 24 and want["summary"]["dropped"] == 24


def synthetic_parquet(root: Path, files: int = 3) -> Path:
    """The demo's 48 synthetic images as a parquet dataset (encoded bytes), in `files` files of row groups of 5."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kolora.ingest.synthetic import make_synthetic

    items = make_synthetic(root / "images", 48, seed=0, min_side=32, max_side=160)
    folder = root / "parquet"
    folder.mkdir()
    for k in range(files):
        part = items[k::files]
        table = pa.table({"image": [p.read_bytes() for p, _ in part], "text": [caption for _, caption in part]})
        pq.write_table(table, folder / f"train-{k:05d}-of-{files:05d}.parquet", row_group_size=5)
    return folder


def test_parquet_ingest_is_sharded_over_the_filter_array(env: dict[str, str], tmp_path: Path) -> None:
    dataset = synthetic_parquet(tmp_path)
    runs = tmp_path / "runs"
    data = ["--set", "data.source=parquet", "--set", f"data.path={dataset}"]
    sub, _ = submit(env, runs, "pq", *data, "--set", "filter.shards=2")
    run = RunDir(runs / "pq")
    filt = sub["jobs"]["filter"]["job_id"]
    rows = wait_ended(env, [filt], 2, run.root)
    kolora(env, "cancel", "pq", "--runs-dir", runs, timeout=60)  # training is not what is tested here
    assert {r["State"] for r in rows.values()} == {"COMPLETED"}, rows

    folder = Path(sub["folder"])
    logs = [(folder / f"{filt}_{i}_0_log.err").read_text() for i in range(2)]
    lines = [re.search(rf"stage ingest \(task {i}\): (.*)", logs[i]) for i in range(2)]
    assert all(lines), logs
    summaries = [ast.literal_eval(line.group(1)) for line in lines]
    # a task that starts once the other has read both ranges and merged finds the stage complete (skipped)
    assert sorted(r for s in summaries for r in s.get("ran", [])) == [0, 1], summaries  # each range read once
    merged = sorted("skipped" if s.get("skipped") else str(s["merged"]) for s in summaries)
    assert merged in (["True", "by another task"], ["True", "skipped"]), summaries
    manifest = json.loads(run.manifest_file.read_text())
    assert manifest["stages"]["ingest"]["status"] == "complete"
    assert manifest["stages"]["ingest"]["summary"]["shards"] == 2
    assert json.loads((run.filter / "report.json").read_text())["summary"]["shards"] == 2

    # the same config in one pass, in this process: the same data/ and the same filter outputs
    cfg = load_config(DEMO, [item for item in data if item != "--set"])
    ref = RunDir(tmp_path / "ref")
    ingest.run(stage_context("ingest", cfg, ref))
    kfilter.run(stage_context("filter", cfg, ref))
    assert data_outputs(run) == data_outputs(ref)
    assert outputs(run) == outputs(ref)


def test_nsfw_and_watermark_filters_run_offline_in_the_filter_job(env: dict[str, str], tmp_path: Path) -> None:
    models = tmp_path / "classifiers"
    fetched = kolora(env, "fetch", "models", "--filters", "nsfw,watermark", "--tiny", "--to", models)
    assert fetched.returncode == 0, fetched.stderr
    # thresholds from the scores of the demo's images (ingested here: the same synthetic set the job ingests)
    ref = RunDir(tmp_path / "ref")
    ingest.run(stage_context("ingest", load_config(DEMO), ref))
    cut_n, cut_w, nsfw, mark = thresholds_for(models, read_samples(ref.data / "metadata.jsonl"))
    runs = tmp_path / "runs"
    sub, _ = submit(env, runs, "classify", "--set", f"filter.ops={json.dumps(classifier_ops(cut_n, cut_w))}",
                    "--set", f"scorers.dir={models}", "--set", "scorers.tiny=false", "--set", "evaluate.enabled=false")
    run = RunDir(runs / "classify")
    filt = sub["jobs"]["filter"]["job_id"]
    rows = wait_ended(env, [filt], 1, run.root)
    kolora(env, "cancel", "classify", "--runs-dir", runs, timeout=60)  # training is not what is tested here
    assert {r["State"] for r in rows.values()} == {"COMPLETED"}, rows
    check_report(json.loads((run.filter / "report.json").read_text()), cut_n, cut_w, nsfw, mark)
    assert str(models / scorers.NSFW) in (run.filter / "dj" / "config.yaml").read_text()
