"""The Apptainer image and container-aware submission, as far as a machine without Apptainer can check them:
the definition file (parsed with spython), the lock file (resolved with pip for the image's Python), the exact
`apptainer exec` argument list, the image digest and the make targets. Tests that need apptainer itself run
when it is on PATH."""

from __future__ import annotations

import hashlib
import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from kolora.core.config import load_config
from kolora.core.errors import ConfigError
from kolora.core.offline import OFFLINE_ENV
from kolora.launch.container import (
    ContainerConfig,
    check_image,
    exec_argv,
    forward_env,
    image_digest,
    merge_binds,
    required_binds,
)

REPO = Path(__file__).resolve().parent.parent
DEF_FILE = REPO / "containers" / "kolora.def"
LOCK_FILE = REPO / "containers" / "requirements.lock"
CONSTRAINTS = REPO / "constraints.txt"
DEMO = REPO / "configs" / "demo.yaml"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def _load_lock_module():
    spec = importlib.util.spec_from_file_location("kolora_containers_lock", REPO / "containers" / "lock.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


lockmod = _load_lock_module()


# ---------------------------------------------------------------------------------------------- definition
@pytest.fixture(scope="module")
def recipe():
    from spython.main.parse.parsers import SingularityParser

    layers = SingularityParser(str(DEF_FILE)).recipe
    assert len(layers) == 1, "one build stage"
    return next(iter(layers.values()))


def sections() -> dict[str, str]:
    """Raw section bodies (spython rewrites %test into a script and drops some comments)."""
    out: dict[str, list[str]] = {"header": []}
    current = "header"
    for line in DEF_FILE.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^%(\w+)", line)
        if m:
            current = m.group(1).lower()
            assert current not in out, f"section %{current} appears twice"
            out[current] = []
        else:
            out[current].append(line)
    return {k: "\n".join(v) for k, v in out.items()}


def _tested_pins() -> dict[str, str]:
    """constraints.txt (the environment CI tests), read here independently of containers/lock.py."""
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        name, sep, version = line.split("#", 1)[0].strip().partition("==")
        if sep:
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_definition_bootstraps_from_debian12_cpython311_like_ci(recipe):
    # Debian 12 (bookworm) and CPython 3.11: the platform CI tests on (tests/test_container.py runs there too)
    assert recipe.fromHeader == "python:3.11-slim-bookworm"
    header = sections()["header"]
    assert re.search(r"^Bootstrap:\s*docker$", header, re.M)
    # the driver note belongs to the torch it describes: a torch bump in constraints.txt fails here until the
    # header (CUDA version, driver, GPUs) is re-read and names the new version
    torch_version = _tested_pins()["torch"]
    assert f"torch {torch_version}'s PyPI wheel is built for CUDA" in header
    assert re.search(r"driver.{0,60}>= \d{3}", header, re.S), "which NVIDIA driver torch's CUDA build needs"
    assert "torch.version.cuda" in header and "org.kolora.lib.torch-cuda" in header
    assert "--nv" in header
    assert {"arguments", "files", "labels", "environment", "post", "runscript", "test", "help"} <= set(sections())


def test_labels_carry_version_base_and_build_time_labels(recipe):
    labels = dict(line.split(None, 1) for line in recipe.labels)
    assert labels["org.kolora.version"] == VERSION
    assert labels["org.opencontainers.image.version"] == VERSION
    assert labels["org.kolora.base-image"] == recipe.fromHeader
    assert labels["org.kolora.python"] == "3.11"
    assert recipe.fromHeader.startswith(f"python:{labels['org.kolora.python']}-"), "the label names the base's Python"
    post = sections()["post"]
    # git sha from a build argument (with a default), library versions found at build time → the labels file
    assert re.search(r"^\s*GIT_SHA=\S+", sections()["arguments"], re.M)
    assert "org.kolora.git-sha {{ GIT_SHA }}" in post
    assert "APPTAINER_LABELS" in post
    assert '"org.kolora.lib.torch-cuda", torch.version.cuda' in post, "the CUDA build is recorded at build time"
    for lib in ("torch", "triton", "diffusers", "transformers", "peft", "lightning", "py-data-juicer", "modelscope",
                "submitit"):
        assert f'"{lib}"' in post, lib
    assert f'version("kolora") != "{VERSION}"' in post, "the build fails when the label and kolora disagree"


def test_environment_is_hub_offline_with_caches_under_a_bound_path(recipe):
    env = dict(line.split("=", 1) for line in recipe.environ)
    for key, value in OFFLINE_ENV.items():
        assert env.get(key) == value, f"%environment must set {key}={value} (kolora.core.offline.OFFLINE_ENV)"
    assert env["PYTHONNOUSERSITE"] == "1"
    assert env["KOLORA_CACHE"] == '"${KOLORA_CACHE:-/tmp/kolora-cache}"'
    for key in ("HF_HOME", "MODELSCOPE_CACHE", "XDG_CACHE_HOME", "UV_CACHE_DIR"):
        assert env[key] == f'"${{{key}:-$KOLORA_CACHE/' + env[key].split("$KOLORA_CACHE/", 1)[1], key


def test_runscript_is_kolora(recipe):
    assert recipe.cmd == 'exec kolora "$@"'


def test_test_section_runs_the_tiny_demo_on_cpu_and_reports_the_gpu(tmp_path):
    body = sections()["test"]
    assert "torch.cuda.is_available()" in body and "nvidia-smi" in body
    assert 'test -s "$work/runs/demo/grid.png"' in body
    line = next(x for x in body.splitlines() if " kolora run " in x)
    words = shlex.split(line.replace("$work", str(tmp_path)))
    assert words[0] == 'CUDA_VISIBLE_DEVICES=', "the smoke test stays on the CPU"
    args = words[words.index("kolora") + 1:]
    assert args[:2] == ["run", "/opt/kolora/configs/demo.yaml"]
    from kolora.cli.main import build_parser

    parsed = build_parser().parse_args(args)
    # the overrides are real config fields with valid values (the same config the image carries)
    cfg = load_config(DEMO, parsed.overrides)
    assert cfg.model.path == tmp_path / "tiny-kolors" and cfg.model.tiny
    assert (cfg.train.accelerator, cfg.cache.device, cfg.render.device) == ("cpu", "cpu", "cpu")
    assert cfg.train.steps <= 2 and cfg.render.steps == 1
    assert parsed.runs_dir == f"{tmp_path}/runs"


def test_post_installs_the_tested_torch_then_the_lock_then_kolora(recipe):
    for entry in recipe.files:
        src, dst = entry.split()
        assert (REPO / src).exists(), f"%files source {src} is missing"
        assert dst.startswith("/opt/kolora/")
    post = sections()["post"]
    commands = [line.strip() for line in post.splitlines() if line.strip() and not line.strip().startswith("#")]
    installs = [c for c in commands if c.startswith("python -m pip install")]
    torch_version = _tested_pins()["torch"]
    # exactly three installs, in this order: torch at constraints.txt's version (its other requirements held at the
    # lock's versions), the lock, kolora without dependencies
    assert installs == [
        f"python -m pip install -c /opt/kolora/containers/requirements.lock torch=={torch_version}",
        "python -m pip install -r /opt/kolora/containers/requirements.lock",
        "python -m pip install --no-deps --no-build-isolation /opt/kolora",
    ]
    assert lockmod.def_torch_version(DEF_FILE) == torch_version
    # PyPI's wheel (the CUDA build), no other index; no leftovers of a base image that brought its own torch
    for word in ("--index-url", "--extra-index-url", "download.pytorch.org", "--find-links", "/opt/conda",
                 "base-constraints"):
        assert word not in post, word
    assert "python -m pip check" in commands, "a broken requirement fails the build"
    # the build fails unless every lock pin is installed exactly and torch is a CUDA build
    assert 'open("/opt/kolora/containers/requirements.lock"' in post and "Version(found) != Version(pinned)" in post
    assert "torch.version.cuda is None" in post
    # what pip chose for the CUDA-build-only wheels is recorded
    assert post.index("cuda-wheels.txt") > post.index(installs[-1])
    assert "sys.version_info[:2]" in post and "(3, 11)" in post, "the build refuses another Python"
    assert "gcc libc6-dev" in post, "crcmod builds from source; Triton compiles launcher stubs"
    assert "kolora --help" in post


def test_readme_describes_the_image_ci_tests():
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Containers (Apptainer)"):]
    section = section[:section.index("\n## ", 3)] if "\n## " in section[3:] else section
    assert "`python:3.11-slim-bookworm`" in section and "Debian 12" in section
    assert f"torch {_tested_pins()['torch']}" in section, "the README names the torch version constraints.txt pins"
    assert "driver ≥" in section


def test_help_says_how_to_use_the_image():
    text = sections()["help"]
    for words in ("apptainer run --nv", "apptainer test", "apptainer inspect --labels", "container:", "scontrol"):
        assert words in text


# --------------------------------------------------------------------------------------------------- lock
def test_lock_is_exactly_what_ci_tested():
    """Every pin of the lock is constraints.txt's pin of that package (the image runs what CI tested), torch
    included; only the CUDA-build-only wheels are left to pip at build time."""
    lock = lockmod.read_lock(LOCK_FILE)
    tested = _tested_pins()
    assert lock, "an empty lock"
    not_tested = sorted(n for n in lock if n not in tested)
    differs = {n: (v, tested[n]) for n, v in lock.items() if n in tested and tested[n] != v}
    assert not not_tested, f"pinned in the lock, not in constraints.txt (CI never ran them): {not_tested}"
    assert not differs, f"the lock and constraints.txt disagree (lock, constraints.txt): {differs}"
    assert lock["torch"] == tested["torch"]
    for name in ("torch", "py-data-juicer", "aiohttp", "ray", "modelscope", "datasets", "submitit", "cloudpickle",
                 "diffusers", "transformers", "peft", "lightning", "pydantic", "setuptools"):
        assert name in lock, name
    cuda_only = re.compile(r"^(triton|nvidia-.+|cuda-.+)$")
    assert not [n for n in lock if cuda_only.match(n)], "torch's CUDA wheels are resolved by pip at build time"
    assert not [n for n in tested if cuda_only.match(n)], "CI's environment has no CUDA wheels to leave out"
    assert all(lockmod.CUDA_ONLY.match(n) for n in ("triton", "nvidia-cudnn-cu13", "cuda-toolkit", "cuda-bindings"))
    assert not any(lockmod.CUDA_ONLY.match(n) for n in tested)
    assert lockmod.drift_problems() == []
    # the header says what it is for
    header = [line for line in LOCK_FILE.read_text().splitlines() if line.startswith("#")]
    text = " ".join(header)
    assert f"torch {tested['torch']} included" in text and "python:3.11-slim-bookworm" in text
    assert "constraints.txt" in text and "make container-lock" in text


def test_drift_problems_catch_a_lock_or_definition_that_left_constraints(tmp_path):
    good_lock = LOCK_FILE.read_text()
    torch_version = _tested_pins()["torch"]

    def problems(lock_text=good_lock, def_text=None):
        (tmp_path / "requirements.lock").write_text(lock_text)
        (tmp_path / "kolora.def").write_text(def_text or DEF_FILE.read_text())
        return lockmod.drift_problems(tmp_path / "requirements.lock", CONSTRAINTS, tmp_path / "kolora.def")

    assert problems() == []
    assert problems(re.sub(r"^diffusers==.*$", "diffusers==0.41.0", good_lock, flags=re.M)) == [
        f"diffusers: the lock pins 0.41.0, constraints.txt {_tested_pins()['diffusers']}"]
    assert problems(good_lock + "left-pad==1.0\n") == [
        "left-pad==1.0 is in the lock but not in constraints.txt (CI did not test it)"]
    assert "nvidia-cudnn-cu13 is in the lock but only torch's CUDA build needs it (pip resolves it at build time)" in \
        problems(good_lock + "nvidia-cudnn-cu13==9.20.0.48\n")
    assert problems(good_lock.replace(f"torch=={torch_version}\n", "")) == ["torch is not in the lock"]
    other = DEF_FILE.read_text().replace(f" torch=={torch_version}\n", " torch==2.7.1\n")
    assert problems(def_text=other) == [
        f"kolora.def installs torch==2.7.1, constraints.txt pins torch=={torch_version}"]
    unpinned = DEF_FILE.read_text().replace(f" torch=={torch_version}\n", " torch\n")
    assert "%post must install torch exactly once" in " ".join(problems(def_text=unpinned))


def test_tested_torch_satisfies_kolora_and_is_what_make_installs(tmp_path):
    from packaging.requirements import Requirement

    torch_version = lockmod.tested_torch_version(CONSTRAINTS)
    assert torch_version == _tested_pins()["torch"]
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_req = next(Requirement(d) for d in deps if Requirement(d).name == "torch")
    assert torch_req.specifier.contains(torch_version), (torch_version, str(torch_req))
    # make's environment (CI) installs the same version first: TORCH_SPEC defaults to constraints.txt's pin
    out = _make(tmp_path, "--eval", "kolora-print-torch-spec: ; @echo TORCH_SPEC=$(TORCH_SPEC)",
                "kolora-print-torch-spec").stdout
    assert f"TORCH_SPEC=torch=={torch_version}" in out.splitlines()


def _index_reachable() -> str | None:
    """Why the package index cannot be used from here (None when it can): one small download, 5 s at most."""
    with __import__("tempfile").TemporaryDirectory() as tmp:
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "pip", "--isolated", "download", "--no-deps", "--only-binary=:all:",
                 "--no-cache-dir", "--timeout", "5", "--retries", "0", "-d", tmp, "-q", "submitit==1.5.4"],
                capture_output=True, text=True, timeout=30, check=False)
        except subprocess.TimeoutExpired:
            return "the package index did not answer within 30 s"
    if proc.returncode:
        return f"the package index is unreachable from here ({(proc.stderr or proc.stdout).strip()[-200:]})"
    return None


NETWORK_ERRORS = re.compile(r"NewConnectionError|ConnectTimeout|ReadTimeout|Temporary failure in name resolution|"
                            r"Network is unreachable|Connection refused|ProxyError", re.I)


@pytest.mark.slow
def test_lock_resolves_for_the_image_python():
    """pip resolves the lock plus kolora's own requirements from the public index, for Python 3.11 on Linux
    x86_64, to exactly the pinned versions, torch as PyPI's CUDA build (its nvidia-*/cuda-*/triton wheels come
    along and are the only packages outside the lock): the image build's installs get what was tested and leave
    nothing of kolora's unmet."""
    why = lockmod.check_interpreter()
    if why:
        pytest.skip(why)
    why = _index_reachable()
    if why:
        pytest.skip(why)
    rc, problems, out = lockmod.check_lock()
    if rc and NETWORK_ERRORS.search(out):
        pytest.skip(f"the package index went away during resolution: {NETWORK_ERRORS.search(out).group(0)}")
    assert rc == 0, out[-4000:]
    assert problems == []


# ----------------------------------------------------------------------------------------------- exec argv
def container(**kw) -> ContainerConfig:
    return ContainerConfig.model_validate({"image": "/shared/containers/kolora.sif", **kw})


def test_exec_argv_without_container_is_the_command_unchanged():
    cmd = ["/opt/venv/bin/python", "-m", "kolora", "run", "x.yaml"]
    assert exec_argv(None, binds=[Path("/scratch/run")], workdir=Path("/scratch/run"), env={"A": "1"},
                     command=cmd) == cmd


def test_exec_argv_exact_list():
    c = container(binds=["/scratch/lab/models:/models:ro"], nv=True, extra_args=["--no-home"],
                  env={"NCCL_DEBUG": "WARN", "HF_HOME": "/overridden"})
    argv = exec_argv(
        c, binds=[Path("/scratch/runs/demo"), "/scratch/runs/demo/slurm", Path("/data/anime")],
        workdir=Path("/scratch/runs/demo"),
        env={"HF_HOME": "/scratch/runs/demo/.hf_home", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "0,1"},
        command=["kolora", "run", "/scratch/runs/demo/config.yaml", "--stage", "train"])
    assert argv == [
        "apptainer", "exec", "--nv", "--cleanenv",
        "--bind", "/data/anime:/data/anime",
        "--bind", "/scratch/lab/models:/models:ro",
        "--bind", "/scratch/runs/demo:/scratch/runs/demo",
        "--pwd", "/scratch/runs/demo",
        "--env", "NCCL_DEBUG=WARN",
        "--env", "HF_HOME=/scratch/runs/demo/.hf_home",
        "--env", "HF_HUB_OFFLINE=1",
        "--env", "CUDA_VISIBLE_DEVICES=0,1",
        "--no-home",
        "/shared/containers/kolora.sif",
        "kolora", "run", "/scratch/runs/demo/config.yaml", "--stage", "train",
    ]
    assert all(isinstance(a, str) for a in argv)


def test_exec_argv_without_nv_and_with_another_runtime():
    argv = exec_argv(container(nv=False, executable="singularity"), binds=[], workdir="/tmp", env={},
                     command=["kolora", "--help"])
    assert argv == ["singularity", "exec", "--cleanenv", "--pwd", "/tmp", "/shared/containers/kolora.sif",
                    "kolora", "--help"]


def test_binds_nested_and_duplicate_are_dropped_parents_first():
    binds = [b.spec() for b in merge_binds(
        ["/scratch/runs/demo/lora", "/scratch", Path("/scratch/runs"), "/scratch/", "/models/kolors:/models/kolors:ro",
         "/models/kolors/unet:/models/kolors/unet:ro", "/data/x/../y"])]
    assert binds == ["/data/y:/data/y", "/models/kolors:/models/kolors:ro", "/scratch:/scratch"]


def test_binds_keep_write_access_and_reject_conflicts():
    # a read-write folder inside a read-only one stays, mounted after its parent
    assert [b.spec() for b in merge_binds(["/shared/lab/runs", "/shared:/shared:ro"])] == [
        "/shared:/shared:ro", "/shared/lab/runs:/shared/lab/runs"]
    # the same folder asked read-only and read-write: read-write
    assert [b.spec() for b in merge_binds(["/m:/m:ro", "/m"])] == ["/m:/m"]
    with pytest.raises(ValueError, match="two binds for /data"):
        merge_binds(["/a:/data", "/b:/data"])


@pytest.mark.parametrize("bad", ["relative/run", "./run", "~/run", "/a:relative", "/a:/b:noexec", "/a,b", "/a:/b:ro:x"])
def test_relative_or_inexpressible_binds_are_rejected(bad):
    with pytest.raises(ValueError):
        exec_argv(container(), binds=[bad], workdir="/tmp", env={}, command=["kolora"])
    with pytest.raises(ValidationError):
        container(binds=[bad])


def test_relative_workdir_image_and_bad_env_are_rejected():
    with pytest.raises(ValueError, match="absolute"):
        exec_argv(container(), binds=[], workdir="runs/demo", env={}, command=["kolora"])
    with pytest.raises(ValueError, match="no command"):
        exec_argv(container(), binds=[], workdir="/tmp", env={}, command=[])
    with pytest.raises(ValidationError, match="absolute path"):
        ContainerConfig(image="kolora.sif")
    with pytest.raises(ValidationError, match="Extra inputs"):
        ContainerConfig.model_validate({"image": "/x.sif", "bind": ["/a"]})
    with pytest.raises(ValidationError, match="not an environment variable name"):
        container(env={"BAD-NAME": "1"})
    # apptainer --env reads a value with '=' as CSV: a comma would split it
    with pytest.raises(ValueError, match="split"):
        exec_argv(container(), binds=[], workdir="/tmp", env={"XLA_FLAGS": "--a=1,--b=2"}, command=["kolora"])
    with pytest.raises(ValueError, match="double quote"):
        exec_argv(container(), binds=[], workdir="/tmp", env={"X": 'say "hi"'}, command=["kolora"])
    assert container(env={"FLAG": True, "N": 8}).env == {"FLAG": "true", "N": "8"}


def test_forward_env_passes_gpu_selection_and_slurm_task_variables():
    host = {"CUDA_VISIBLE_DEVICES": "2,3", "SLURM_PROCID": "1", "SLURM_JOB_NODELIST": "gpu[01-02]",
            "SLURM_JOB_ID": "123", "PYTHONPATH": "/home/u/lib", "LD_LIBRARY_PATH": "/opt/cuda/lib64",
            "SLURM_WEIRD": "a=b,c", "HOME": "/home/u"}
    assert forward_env(host) == {"CUDA_VISIBLE_DEVICES": "2,3", "SLURM_JOB_ID": "123",
                                 "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_PROCID": "1"}


SITE_NETWORK = {"NCCL_SOCKET_IFNAME": "ib0", "NCCL_IB_HCA": "mlx5_0", "UCX_TLS": "rc,sm", "FI_PROVIDER": "cxi",
                "OMPI_MCA_btl": "^openib", "PMIX_RANK": "1", "MYSITE_FABRIC": "hdr200",
                "PYTHONPATH": "/home/u/lib", "SLURM_PROCID": "1", "CUDA_VISIBLE_DEVICES": "0,1"}


def _stage_argv(tmp_path: Path, **container_fields) -> list[str]:
    """The argument list a Slurm job runs its stage with, on a host with the site's network settings."""
    from kolora.launch.jobs import StageJob

    job = StageJob(str(tmp_path / "run"), str(tmp_path / "run" / "config.yaml"), str(tmp_path / "jobs"), "stamp",
                   "train", ("cache", "train"), tasks_per_node=2, env={"HF_HUB_OFFLINE": "1"},
                   container={"image": "/shared/containers/kolora.sif", **container_fields},
                   binds=[str(tmp_path / "run")])
    return job.child_command(0, environ=SITE_NETWORK)


def _env_args(argv: list[str]) -> dict[str, str]:
    return dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "--env")


def test_site_network_settings_reach_the_container_by_default(tmp_path):
    env = _env_args(_stage_argv(tmp_path))
    for name in ("NCCL_SOCKET_IFNAME", "NCCL_IB_HCA", "UCX_TLS", "FI_PROVIDER", "OMPI_MCA_btl", "PMIX_RANK",
                 "SLURM_PROCID", "CUDA_VISIBLE_DEVICES"):
        assert env[name] == SITE_NETWORK[name], name
    assert "PYTHONPATH" not in env and "MYSITE_FABRIC" not in env  # --cleanenv still keeps the rest out
    assert env["HF_HUB_OFFLINE"] == "1"


def test_profile_adds_and_removes_forwarded_prefixes(tmp_path):
    argv = _stage_argv(tmp_path, forward_env_prefixes={"add": ["MYSITE_"], "remove": ["UCX_", "PMIX_"]},
                       env={"NCCL_SOCKET_IFNAME": "hsn0"})
    env = _env_args(argv)
    assert env["MYSITE_FABRIC"] == "hdr200" and env["FI_PROVIDER"] == "cxi"
    assert "UCX_TLS" not in env and "PMIX_RANK" not in env
    assert env["NCCL_SOCKET_IFNAME"] == "hsn0"  # container.env, set on purpose, wins over the host's value
    assert argv.count("NCCL_SOCKET_IFNAME=hsn0") == 1 and not any(a.startswith("NCCL_SOCKET_IFNAME=ib0") for a in argv)
    assert container(forward_env_prefixes={"add": ["MYSITE_"]}).forward_env_prefixes.prefixes() == (
        "SLURM_", "NCCL_", "GLOO_", "UCX_", "FI_", "OMPI_", "PMIX_", "MYSITE_")


@pytest.mark.parametrize(("prefixes", "message"), [
    ({"remove": ["SLURM_"]}, "SLURM_ cannot be removed"),
    ({"remove": ["LD_"]}, "LD_ is not forwarded by default"),
    ({"add": ["NCCL-"]}, "not the start of an environment variable name"),
    ({"add": [""]}, "not the start of an environment variable name"),
    ({"add": ["FI_"], "remove": ["FI_"]}, "FI_ is both added and removed"),
    ({"keep": ["X_"]}, r"forward_env_prefixes\.keep\s+Extra inputs"),
])
def test_bad_forward_env_prefixes_are_refused_naming_the_field(tmp_path, prefixes, message):
    from kolora.launch.cluster import load_profile

    with pytest.raises(ValidationError, match=message):
        container(forward_env_prefixes=prefixes)
    profile = tmp_path / "site.yaml"
    profile.write_text(yaml.safe_dump({"name": "site", "container": {
        "image": "/shared/containers/kolora.sif", "forward_env_prefixes": prefixes}}))
    with pytest.raises(ConfigError, match=r" container\.forward_env_prefixes"):
        load_profile(profile)


# -------------------------------------------------------------------------------------------- digest, binds
@pytest.mark.parametrize("size", [0, 1, 4096, 3 * (1 << 20) + 17])
def test_image_digest_is_the_sha256_of_the_file(tmp_path, size):
    f = tmp_path / "kolora.sif"
    data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    f.write_bytes(data)
    assert image_digest(f) == "sha256:" + hashlib.sha256(data).hexdigest()
    assert image_digest(f, chunk_size=1000) == image_digest(f)


def test_check_image_fails_before_queueing(tmp_path):
    with pytest.raises(ConfigError, match="make container"):
        check_image(ContainerConfig(image=tmp_path / "missing.sif"))
    (tmp_path / "kolora.sif").write_bytes(b"SIF")
    check_image(ContainerConfig(image=tmp_path / "kolora.sif"))


def test_required_binds_cover_run_model_data_prompts_and_caches(tmp_path):
    runs = tmp_path / "runs"
    (runs / "demo").mkdir(parents=True)
    data = tmp_path / "datasets" / "anime"
    data.mkdir(parents=True)
    lora = tmp_path / "adapters" / "other.safetensors"
    lora.parent.mkdir()
    lora.write_bytes(b"")
    cache = tmp_path / "cache" / "hf"
    cache.mkdir(parents=True)
    cfg = load_config(DEMO, [f"model.path={tmp_path}/models/tiny-kolors", "data.source=folder", f"data.path={data}",
                             f"render.lora={lora}"])
    (tmp_path / "models").mkdir()
    got = required_binds(cfg, runs / "demo", extra=[cache, runs / "demo" / "slurm" / "stamp", None])
    assert got == sorted([
        tmp_path / "adapters",               # a file: its folder
        cache,
        data,
        tmp_path / "models",                 # a tiny model built at run time: the folder it will appear in
        runs / "demo",                       # the job folder inside it is covered
        REPO / "configs" / "prompts",        # the prompt set's folder
    ], key=lambda p: p.parts)


def test_required_binds_refuse_paths_with_nothing_to_bind(tmp_path):
    cfg = load_config(DEMO, ["model.path=/nonexistent-kolora-root/models/tiny"])
    with pytest.raises(ConfigError, match="model.path"):
        required_binds(cfg, tmp_path)


# --------------------------------------------------------------------------------------------- make, apptainer
def _make(tmp_path, *args: str) -> subprocess.CompletedProcess:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    mk = tmp_path / "test.mk"
    mk.write_text(f"include {REPO / 'Makefile'}\ninclude {REPO / 'containers' / 'container.mk'}\n")
    return subprocess.run(["make", "--no-print-directory", "-f", str(mk), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=False)


def test_make_container_builds_with_the_git_sha_and_tests_the_image(tmp_path):
    out = _make(tmp_path, "-n", "-B", "container", "container-test", "APPTAINER=apptainer-stub").stdout
    build = next(line for line in out.splitlines() if line.startswith("apptainer-stub build"))
    words = shlex.split(build)
    assert words[-2:] == ["containers/kolora.sif", "containers/kolora.def"]
    assert "--force" in words
    sha = words[words.index("--build-arg") + 1]
    assert re.fullmatch(r"GIT_SHA=([0-9a-f]{40}(-dirty)?|unknown)", sha), sha
    test = next(line for line in out.splitlines() if line.startswith("apptainer-stub test"))
    assert shlex.split(test) == ["apptainer-stub", "test", "containers/kolora.sif"]


def test_make_container_without_apptainer_says_what_to_do(tmp_path):
    proc = _make(tmp_path, "container", "APPTAINER=kolora-no-such-apptainer", "CONTAINER_SIF=" + str(tmp_path / "x.sif"))
    assert proc.returncode != 0
    assert "is not on PATH" in proc.stdout + proc.stderr


@pytest.mark.skipif(shutil.which("apptainer") is None,
                    reason="apptainer is not on PATH (not in Debian 12's archive); the image is built and tested "
                           "on a cluster with `make container container-test`")
def test_apptainer_is_usable():
    proc = subprocess.run(["apptainer", "--version"], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0 and "apptainer" in proc.stdout.lower()
