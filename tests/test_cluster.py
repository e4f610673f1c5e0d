"""Cluster profiles (slurm/clusters/*.yaml): the shipped ones load, every problem names its field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kolora.core.errors import ConfigError
from kolora.launch.cluster import ClusterProfile, find_profile, load_profile, parse_time

REPO = Path(__file__).resolve().parents[1]
CLUSTERS = REPO / "slurm" / "clusters"


def write_profile(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"name": "p", **data}))
    return path


def test_shipped_profiles_load() -> None:
    local = load_profile(CLUSTERS / "local.yaml")
    assert local.resources("filter").partition == "cpu" and local.resources("filter").gpus == 0
    train = local.resources("train")
    assert (train.partition, train.gpus, train.mem) == ("gpu", 1, "4G")
    render = local.resources("render")
    assert (render.partition, render.gpus, render.tiles_per_task, render.array_throttle) == ("gpu", 1, 2, 2)
    assert local.resources("grid").time_min == 10 and local.resources("train").time_min == 30  # defaults.time

    uni = load_profile(CLUSTERS / "example-university.yaml")
    train = uni.resources("train")
    assert (train.account, train.qos, train.time_min, train.gpu_type) == ("lab-kolors", "normal", 24 * 60, "a100")
    assert train.setup == ["module purge", "module load cuda/12.4 nccl"]  # the profile's, then the job's
    assert uni.resources("grid").setup == ["module purge"]
    assert train.extra == {"exclusive": True}


def test_profile_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    assert find_profile("local") == REPO / "slurm" / "clusters" / "local.yaml"
    with pytest.raises(ConfigError, match="does not exist"):
        find_profile("no-such-cluster")


@pytest.mark.parametrize("value, minutes", [(90, 90), ("90", 90), ("1:30", 2), ("1:30:00", 90), ("2-00", 2880),
                                            ("1-01:30", 1530), ("0-00:00:30", 1)])
def test_parse_time(value, minutes) -> None:
    assert parse_time(value) == minutes


@pytest.mark.parametrize("jobs, field", [
    ({"train": {"gpus": -1}}, "jobs.train.gpus"),
    ({"render": {"array_throttle": 0}}, "jobs.render.array_throttle"),
    ({"render": {"tiles_per_task": 0}}, "jobs.render.tiles_per_task"),
    ({"train": {"time": "soon"}}, "jobs.train.time"),
    ({"train": {"mem": "lots"}}, "jobs.train.mem"),
    ({"train": {"partition": "gpu a100"}}, "jobs.train.partition"),
    ({"grid": {"account": "lab\nrm -rf /"}}, "jobs.grid.account"),
    ({"train": {"gres": "gpu:2"}}, "jobs.train.gres"),
    ({"train": {"extra": {"dependency": "afterok:1"}}}, "jobs.train.extra"),
    ({"train": {"extra": {"no-requeue": True}}}, "jobs.train.extra"),  # kolora requeues: --requeue is always set
    ({"train": {"extra": {"mail user": "x"}}}, "jobs.train.extra"),
    ({"train": {"setup": ["module load x\nevil"]}}, "jobs.train.setup"),
    ({"train": {"gpu": 2}}, "jobs.train.gpu"),
    ({"render": {"gpus": 2}}, "jobs.render.gpus"),
    ({"grid": {"nodes": 2}}, "jobs.grid.nodes"),
    ({"cache": {"gpus": 1}}, "jobs.cache"),
])
def test_errors_name_the_field(tmp_path: Path, jobs: dict, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_profile(write_profile(tmp_path, {"jobs": jobs}))
    assert f" {field}" in str(err.value), str(err.value)


def test_top_level_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r" signal_lead_s: "):
        load_profile(write_profile(tmp_path, {"signal_lead_s": -5}))
    with pytest.raises(ConfigError, match=r"jobs.train: time 2 min is not longer than signal_lead_s \(120 s\)"):
        load_profile(write_profile(tmp_path, {"signal_lead_s": 120, "jobs": {"train": {"time": 2}}}))
    assert load_profile(write_profile(tmp_path, {"signal_lead_s": 119, "jobs": {"train": {"time": 2}}}))
    with pytest.raises(ConfigError, match=r" python: "):
        load_profile(write_profile(tmp_path, {"python": []}))
    with pytest.raises(ConfigError, match=r" env: .*not an environment variable name"):
        load_profile(write_profile(tmp_path, {"env": {"A-B": "1"}}))
    with pytest.raises(ConfigError, match=r" partitions: unknown field"):
        load_profile(write_profile(tmp_path, {"partitions": {}}))


def test_defaults_and_job_overrides() -> None:
    p = ClusterProfile.model_validate({
        "name": "x", "setup": ["module load a"],
        "defaults": {"account": "lab", "time": "2:00:00", "extra": {"mail-type": "FAIL"}, "setup": ["b"]},
        "jobs": {"train": {"time": 30, "gpus": 4, "extra": {"exclusive": True}}},
    })
    train, grid = p.resources("train"), p.resources("grid")
    assert (train.account, train.time_min, train.gpus) == ("lab", 30, 4)
    assert train.extra == {"mail-type": "FAIL", "exclusive": True}
    assert (grid.time_min, grid.gpus, grid.cpus, grid.nodes) == (120, 0, 1, 1)
    assert grid.setup == ["module load a", "b"]


def test_relative_paths_resolve_against_the_profile(tmp_path: Path) -> None:
    p = load_profile(write_profile(tmp_path, {"job_folder": "jobs", "hf_home": "/abs/hf"}))
    assert p.job_folder == tmp_path / "jobs" and p.hf_home == Path("/abs/hf")
