"""One device per rank (kolora.core.devices): every stage of a multi-GPU job computes on the rank's own GPU, and
CUDA knows it before any CUDA work. On this CPU machine torch.cuda and Lightning's view of it are
monkeypatched to show N GPUs; nothing is allocated on them (the gpu-marked tests run the real thing)."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import stage_context, untrained_copy

from kolora.cache import stage as cache
from kolora.core import devices
from kolora.core.errors import InputError
from kolora.core.rundir import RunDir
from kolora.models import scorers
from kolora.render import stage as render
from kolora.train import checkpoint, distributed
from kolora.train import loop as train_mod


@pytest.fixture
def gpus(monkeypatch):
    """`gpus(n, local_rank)`: this process sees n GPUs and is local rank `local_rank` of an srun step;
    returns the list of set_device calls."""
    calls: list[int] = []

    def setup(n: int, local_rank: int) -> list[int]:
        import lightning.fabric.accelerators.cuda as fabric_cuda
        import lightning.pytorch.accelerators.cuda as pl_cuda

        monkeypatch.delenv("LOCAL_RANK", raising=False)
        monkeypatch.setenv("SLURM_LOCALID", str(local_rank))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(int(i)))
        monkeypatch.setattr(torch.cuda, "current_device", lambda: calls[-1] if calls else 0)
        for module in (fabric_cuda, pl_cuda):
            monkeypatch.setattr(module, "num_cuda_devices", lambda: n)
        return calls

    return setup


@pytest.mark.parametrize(("visible", "local_rank", "expected"), [(4, 0, 0), (4, 3, 3), (1, 3, 0), (2, 1, 1)])
def test_each_rank_picks_its_own_gpu_and_makes_it_current(gpus, visible, local_rank, expected):
    calls = gpus(visible, local_rank)
    assert devices.pick("auto") == f"cuda:{expected}"
    assert devices.pick("cuda") == f"cuda:{expected}"
    assert calls == [expected, expected]  # set before any CUDA work of the stage
    assert devices.pick("cpu") == "cpu"


def test_local_rank_prefers_the_launchers_local_rank(gpus, monkeypatch):
    gpus(4, 1)
    monkeypatch.setenv("LOCAL_RANK", "2")  # torchrun / Lightning's own launcher
    assert devices.pick("auto") == "cuda:2"


def test_a_rank_without_a_gpu_of_its_own_is_refused(gpus):
    gpus(2, 3)
    with pytest.raises(InputError, match="local rank 3 has no GPU of its own: this process sees 2 GPUs"):
        devices.pick("auto")


def test_asking_for_a_gpu_where_there_is_none_names_the_field(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.pick("auto") == "cpu"
    with pytest.raises(InputError, match="asks for a GPU and this process sees none"):
        devices.pick("cuda")


@pytest.mark.parametrize(("visible", "local_rank", "expected"), [(4, 2, "cuda:2"), (1, 2, "cuda:0")])
def test_a_cache_rank_encodes_on_its_own_gpu(gpus, demo_run, tmp_path, monkeypatch, visible, local_rank,
                                             expected):
    """Rank r of a 4-rank cache loads its encoders onto cuda:r (one GPU per task: cuda:0); the encoding
    itself runs on the CPU here."""
    run, cfg = untrained_copy(demo_run, tmp_path / "run")
    shutil.rmtree(run.cache)
    calls = gpus(visible, local_rank)
    seen: dict[str, set] = {"text": set(), "latent": set()}
    encode_texts, encode_latents = cache._encode_texts, cache._encode_latents

    def texts_on_cpu(cfg, files, todo, out, device, *rest):
        seen["text"].add((device, tuple(calls)))
        return encode_texts(cfg, files, todo, out, "cpu", *rest)

    def latents_on_cpu(cfg, files, todo, out, device, *rest):
        seen["latent"].add((device, tuple(calls)))
        return encode_latents(cfg, files, todo, out, "cpu", *rest)

    monkeypatch.setattr(cache, "_encode_texts", texts_on_cpu)
    monkeypatch.setattr(cache, "_encode_latents", latents_on_cpu)
    summary = cache.run(stage_context("cache", cfg, run, rank=local_rank, world=4, extra={"barrier": str(tmp_path / "barrier")}))
    assert summary["device"] == expected and summary["encoded_images"] > 0
    index = int(expected.split(":")[1])
    assert seen == {"text": {(expected, (index,))}, "latent": {(expected, (index,))}}


def test_a_cache_rank_with_no_captions_left_never_loads_the_text_encoder(demo_run, tmp_path, monkeypatch):
    from kolora.models import kolors as models
    run, cfg = untrained_copy(demo_run, tmp_path / "run")
    shutil.rmtree(run.cache)
    cfg.cache.dir = str(tmp_path / "store")
    loaded = []
    real = models.prompt_encoder
    monkeypatch.setattr(models, "prompt_encoder", lambda *a: loaded.append(a[-1]) or real(*a))
    cache.run(stage_context("cache", cfg, run, rank=1, world=2, extra={"barrier": str(tmp_path / "b1")}))
    assert loaded == ["cpu"]  # rank 1 had captions to encode
    shutil.rmtree(run.cache)
    cache.run(stage_context("cache", cfg, run, rank=1, world=2, extra={"barrier": str(tmp_path / "b2")}))  # a second run: all in the store
    assert loaded == ["cpu"]


def _slurm_rank(monkeypatch, rank: int, tasks: int) -> None:
    for name, value in {"SLURM_NTASKS": tasks, "SLURM_PROCID": rank, "SLURM_LOCALID": rank, "SLURM_NODEID": 0,
                        "SLURM_NTASKS_PER_NODE": tasks, "SLURM_NNODES": 1, "SLURM_JOB_ID": 4242,
                        "SLURM_JOB_NAME": "kolora-train", "SLURM_NODELIST": "localhost"}.items():
        monkeypatch.setenv(name, str(value))


class _Built(Exception):
    pass


@pytest.mark.parametrize(("visible", "rank", "expected"), [(4, 0, 0), (4, 3, 3), (1, 3, 0)])
def test_training_rank_runs_on_its_own_gpu(gpus, demo_run, tmp_path, monkeypatch, visible, rank, expected):
    """train.run as rank r of a 4-task Slurm step: Lightning's strategy puts the module on cuda:r (on cuda:0
    when each task sees only its own GPU), and CUDA's current device was set before the UNet was loaded."""
    import lightning as L
    from lightning.pytorch.utilities import rank_zero as pl_rank_zero
    from lightning_utilities.core import rank_zero as utils_rank_zero

    # Lightning records the process's global rank in module globals when a strategy is set up: restore them,
    # or every later Trainer of this pytest process would think it is rank 3 and log nothing
    for module in (pl_rank_zero, utils_rank_zero):
        monkeypatch.setattr(module.rank_zero_only, "rank", getattr(module.rank_zero_only, "rank", 0))
    run, cfg = untrained_copy(demo_run, tmp_path / "run")
    _slurm_rank(monkeypatch, rank, 4)
    calls = gpus(visible, rank)
    built = {}
    real_load = train_mod.models.load_unet

    def load_unet(*a, **k):
        built["set_device_before_load"] = list(calls)
        return real_load(*a, **k)

    real_trainer = L.Trainer

    def trainer(**kw):
        t = real_trainer(**kw)
        built.update(root=t.strategy.root_device, processes=t.strategy.num_processes, world=t.world_size,
                     rank=t.global_rank)
        raise _Built

    monkeypatch.setattr(train_mod.models, "load_unet", load_unet)
    monkeypatch.setattr(train_mod.L, "Trainer", trainer)
    cfg.train.precision = "32-true"
    with pytest.raises(_Built):
        train_mod.run(stage_context("train", cfg, run, devices=4, nodes=1))
    assert built["set_device_before_load"] == [expected]
    assert built["root"] == torch.device("cuda", expected)
    assert (built["processes"], built["world"], built["rank"]) == (4, 4, rank)


def test_one_process_on_a_gpu_names_it():
    assert distributed.placement("cpu", 2, 1) == {"accelerator": "cpu", "devices": 2, "num_nodes": 1,
                                                  "strategy": "ddp"}
    assert distributed.placement("cuda:3", 1, 1) == {"accelerator": "gpu", "devices": [3], "num_nodes": 1,
                                                     "strategy": "auto"}


def test_render_and_evaluate_use_the_ranks_gpu(gpus, demo_run, monkeypatch):
    calls = gpus(2, 1)
    cfg = RunDir(demo_run).load_config()
    assert render._device_dtype(cfg) == ("cuda:1", torch.float16)
    moved = []
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: moved.append(a) or self)
    scorers.ensure_tiny(cfg.scorers)
    folder = scorers.local_folder(cfg.scorers.dir, cfg.scorers.clip)
    loaded = scorers.load_clip(folder, cfg.scorers.clip, "auto")
    assert loaded.device == "cuda:1" and ("cuda:1",) in moved and calls[-1] == 1


# ---- resume on fewer GPUs ----------------------------------------------------------------------------------
@pytest.fixture
def cuda_rng(monkeypatch):
    """A fake CUDA RNG: one generator state per visible device, as torch keeps them; `set_rng_state_all`
    raises IndexError past the visible devices as the real one does."""
    states: dict[int, torch.Tensor] = {}
    current = {"device": 0}
    visible = {"n": 0}

    def check(i: int) -> int:
        if i >= visible["n"]:
            raise IndexError(f"device {i} of {visible['n']}")
        return i

    def index(device) -> int:
        return current["device"] if device in ("cuda", None) else torch.device(device).index

    def setup(n: int, device: int = 0):
        visible["n"], current["device"] = n, device
        for i in range(n):
            states.setdefault(i, torch.tensor([i, 7], dtype=torch.uint8))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: visible["n"])
        monkeypatch.setattr(torch.cuda, "current_device", lambda: current["device"])
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": states[check(index(device))].clone())
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [states[i].clone() for i in range(visible["n"])])

        def set_state(state, device="cuda"):
            states[check(index(device))] = state.clone()

        def set_all(new):
            for i, s in enumerate(new):
                set_state(s, i)

        monkeypatch.setattr(torch.cuda, "set_rng_state", set_state)
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_all)
        monkeypatch.setattr(torch, "manual_seed", lambda seed: states.update({current["device"]: torch.tensor(
            [seed % 256, 0], dtype=torch.uint8)}))
        return states

    return setup


def test_rng_state_written_with_two_gpus_resumes_on_one(cuda_rng):
    states = cuda_rng(2, device=1)
    states[1] = torch.tensor([42, 42], dtype=torch.uint8)
    saved = checkpoint.rng_state()  # rank 1 of a 2-GPU job: its own GPU's state only
    assert torch.equal(saved["cuda"], torch.tensor([42, 42], dtype=torch.uint8))

    states = cuda_rng(1, device=0)  # `kolora resume --gpus 1`: one GPU visible
    checkpoint.set_rng_state(saved)
    assert torch.equal(states[0], torch.tensor([42, 42], dtype=torch.uint8))


def test_ranks_restore_their_own_state_and_new_ranks_are_seeded(cuda_rng):
    states = cuda_rng(1, device=0)
    per_rank = []
    for r in range(2):
        states[0] = torch.tensor([r, r], dtype=torch.uint8)
        per_rank.append(checkpoint.rng_state())
    block = {"rng": per_rank[0], "rng_ranks": per_rank}
    assert checkpoint.restore_rank_rng(block, 1, 2, seed=5) is None
    assert torch.equal(states[0], torch.tensor([1, 1], dtype=torch.uint8))
    note = checkpoint.restore_rank_rng(block, 0, 1, seed=5)
    assert "states of ranks 1–1 are dropped" in note and torch.equal(states[0], torch.tensor([0, 0], dtype=torch.uint8))
    note = checkpoint.restore_rank_rng(block, 2, 3, seed=5)
    assert note.startswith("rank 2: the checkpoint holds RNG states for 2 rank(s)") and "(7)" in note
    assert torch.equal(states[0], torch.tensor([7, 0], dtype=torch.uint8))


def test_an_older_checkpoint_with_every_visible_gpus_state_resumes_on_fewer(cuda_rng):
    cuda_rng(2, device=0)
    old = checkpoint.rng_state()
    old["cuda"] = torch.cuda.get_rng_state_all()  # what kolora wrote before: one state per visible GPU
    states = cuda_rng(1, device=0)
    checkpoint.set_rng_state(old)
    assert torch.equal(states[0], old["cuda"][0])


def test_a_rank_restores_its_own_gpus_state_and_leaves_the_others(cuda_rng):
    states = cuda_rng(2, device=1)  # rank 1 of a 2-GPU job, resumed on 2 GPUs
    states[1] = torch.tensor([42, 42], dtype=torch.uint8)
    saved = checkpoint.rng_state()
    cpu = torch.rand(3)  # the CPU generator moves on after the save
    states[1], states[0] = torch.tensor([1, 1], dtype=torch.uint8), torch.tensor([5, 5], dtype=torch.uint8)
    checkpoint.set_rng_state(saved)
    assert torch.equal(states[1], torch.tensor([42, 42], dtype=torch.uint8))
    assert torch.equal(states[0], torch.tensor([5, 5], dtype=torch.uint8))  # another rank's GPU: untouched
    assert torch.equal(torch.rand(3), cpu)  # the CPU generator is back at the save too
