"""DDP training whose result does not depend on the number of processes: the global sample order, per-sample
draws, one checkpoint/stop decision for all ranks, elastic resume, and the Slurm environment Lightning reads.

The multi-process runs here are real: 2 training processes joined by gloo on the CPU, started as Lightning's
externally launched ranks (tests/ddp_worker.py), on the tiny demo model.

Tolerance (measured, stated in the README): a 2-process run and a 1-process run with the doubled batch, or the
2-process run resumed on 1 process with 2 accumulated micro-batches, differ only by float summation order:
the global batch's loss of every step agrees within LOSS_TOLERANCE (relative), and the LoRA tensors within
TOLERANCE (max |Δ| relative to the tensor's max |w|; AdamW divides by √v, which magnifies the rounding of the
near-zero gradients of a freshly initialised LoRA). A rank's own loss differs from the global batch's by ~10 %:
the loss check sees any sample or noise that differs.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kolora.core.errors import InputError
from kolora.core.rundir import RunDir
from kolora.train import distributed, objective
from kolora.train.samples import BucketSampler, RankShare, StepSampler

WORKER = str(Path(__file__).with_name("ddp_worker.py"))
STEPS = 12
TOLERANCE = 1e-3
LOSS_TOLERANCE = 1e-5
LORA = "lora/pytorch_lora_weights.safetensors"


# ---- the global sample sequence and the draws ---------------------------------------------------------------
def _shares(sequence_for, steps: int, per_rank: int, world: int, accumulate: int = 1, start: int = 0):
    """{rank: [(position, index), ...]} of every rank."""
    return {r: list(RankShare(sequence_for(start), steps, start, per_rank, world, r, accumulate)) for r in range(world)}


def _by_step(shares: dict[int, list], per_step: int) -> list[set]:
    steps: dict[int, set] = {}
    for pairs in shares.values():
        for i in range(0, len(pairs), per_step):
            steps.setdefault(i // per_step, set()).update(pairs[i:i + per_step])
    return [steps[k] for k in sorted(steps)]


def test_every_split_of_the_global_batch_trains_on_the_same_samples_at_each_step():
    n, steps = 7, 9
    for make in (lambda size: lambda start: StepSampler(n, steps * size, 3, start=start * size),
                 lambda size: lambda start: BucketSampler([(8, 8)] * 4 + [(16, 8)] * 3, size, steps, 3, start)):
        one = _shares(make(4), steps, 4, 1)  # 1 process, batch 4
        two = _shares(make(4), steps, 2, 2)  # 2 processes, batch 2
        accumulated = _shares(make(4), steps, 2, 1, accumulate=2)  # 1 process, 2 micro-batches of 2
        four = _shares(make(4), steps, 1, 2, accumulate=2)  # 2 processes, 2 micro-batches of 1
        reference = _by_step(one, 4)
        assert _by_step(two, 2) == reference and _by_step(accumulated, 4) == reference
        assert _by_step(four, 2) == reference
        assert [p for p, _ in one[0]] == list(range(steps * 4))  # positions: the sequence, in order
        # a resume at step 5 on another split continues the same sequence
        resumed = _shares(make(4), steps, 2, 2, start=5)
        assert _by_step(resumed, 2) == reference[5:]


def test_per_sample_draws_do_not_depend_on_how_the_batch_is_split():
    whole = objective.draw(0, 3, [12, 13, 14, 15], (4, 4, 8, 8), 1100, noise_offset=0.1, caption_dropout=0.5)
    halves = [objective.draw(0, 3, p, (2, 4, 8, 8), 1100, noise_offset=0.1, caption_dropout=0.5)
              for p in ([12, 13], [14, 15])]
    assert torch.equal(whole.noise, torch.cat([h.noise for h in halves]))
    assert torch.equal(whole.drop, torch.cat([h.drop for h in halves]))
    assert all(torch.equal(whole.timestep, h.timestep) for h in halves)  # one timestep per global batch
    assert not torch.equal(whole.noise[0], whole.noise[1])  # each sample its own noise


def test_elastic_resume_keeps_the_global_batch_or_refuses():
    recorded = distributed.GlobalBatch(2, 2, 1).record()
    assert distributed.GlobalBatch.resumed(recorded, 2, 1, "ckpt") == distributed.GlobalBatch(2, 1, 2)
    assert distributed.GlobalBatch.resumed(recorded, 1, 2, "ckpt") == distributed.GlobalBatch(1, 2, 2)
    assert distributed.GlobalBatch.resumed(None, 2, 3, "ckpt") == distributed.GlobalBatch(2, 3, 1)
    with pytest.raises(InputError, match=r"global batch of 4 .*3 processes × train.batch_size 2 cannot make 4"):
        distributed.GlobalBatch.resumed(recorded, 2, 3, "ckpt")


# ---- Lightning under Slurm: multi-node environment, signals -------------------------------------------------
def test_lightning_reads_a_multi_node_slurm_job_as_planned(monkeypatch):
    from lightning.fabric.plugins.environments import SLURMEnvironment

    env = {"SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "2", "SLURM_PROCID": "3",
           "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "kolora-x-train",
           "SLURM_NODELIST": "gpu[07-08]", "MASTER_PORT": "41234"}
    # Lightning writes MASTER_ADDR into os.environ itself: restore the whole environment afterwards, or the
    # Slurm jobs later tests submit inherit "gpu07" as their rendezvous host
    monkeypatch.setattr(os, "environ", os.environ.copy())
    for key in [k for k in os.environ if k.startswith("SLURM_")] + ["MASTER_ADDR", "MASTER_PORT"]:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert SLURMEnvironment.detect()
    slurm = SLURMEnvironment(auto_requeue=False)
    slurm.validate_settings(num_devices=2, num_nodes=2)  # raises when ntasks-per-node ≠ devices or nnodes ≠ nodes
    assert (slurm.world_size(), slurm.global_rank(), slurm.local_rank(), slurm.node_rank()) == (4, 3, 1, 1)
    assert slurm.main_address == "gpu07" and slurm.main_port == 41234  # the port rank 0 chose, not 15000 + id
    with pytest.raises(ValueError):
        slurm.validate_settings(num_devices=4, num_nodes=1)


def test_multi_node_plan_asks_for_nodes_tasks_and_gpus_per_node(tmp_path):
    import yaml

    from kolora.core.config import load_config
    from kolora.launch.cluster import load_profile
    from kolora.launch.plan import plan_jobs, sbatch_script

    profile = yaml.safe_load((Path(__file__).parents[1] / "slurm" / "clusters" / "local.yaml").read_text())
    profile["jobs"]["train"].update(gpus=2, nodes=3)
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(profile))
    plans = {p.job: p for p in plan_jobs(load_config(Path(__file__).parents[1] / "configs" / "demo.yaml"),
                                         load_profile(tmp_path / "p.yaml"))}
    script = sbatch_script(plans["train"], tmp_path, "python", None)
    for line in ("#SBATCH --nodes=3", "#SBATCH --ntasks-per-node=2", "#SBATCH --gpus-per-node=2",
                 "#SBATCH --requeue"):
        assert line + "\n" in script, script
    assert "--gres=gpu" not in script
    render = sbatch_script(plans["render"], tmp_path, "python", None)
    assert "#SBATCH --gres=gpu:1\n" in render and "--nodes=1\n" in render


def test_lightning_does_not_install_its_sigterm_handler():
    import lightning as L

    from kolora.core import interrupt
    seen = {}

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            seen["handler"] = signal.getsignal(signal.SIGTERM)
            return self.layer(batch).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.randn(2, 2), batch_size=1)

    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    distributed.keep_signals_out(trainer)
    with interrupt.handle():
        ours = signal.getsignal(signal.SIGTERM)
        trainer.fit(Tiny())
    assert seen["handler"] is ours and not trainer.received_sigterm


# ---- real multi-process training --------------------------------------------------------------------------
def _copy_run(demo_run: Path, dst: Path) -> RunDir:
    shutil.copytree(demo_run, dst)
    for d in ("train", "lora", "render"):
        shutil.rmtree(dst / d, ignore_errors=True)
    return RunDir(dst)


def train_ranks(run: RunDir, world: int, timeout: float = 600, **overrides) -> list[subprocess.CompletedProcess]:
    """Train `run` with `world` processes (gloo); returns each rank's finished process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parents[1] / "src"),
                                                      env.get("PYTHONPATH")]))
    if world > 1:
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(distributed.free_port()), WORLD_SIZE=str(world),
                   NODE_RANK="0")
    procs = [subprocess.Popen([sys.executable, WORKER, str(run.root), str(world), json.dumps(overrides)],
                              env={**env, **({"LOCAL_RANK": str(r)} if world > 1 else {})},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]
    done = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)  # a hang fails here (mismatched collectives)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            p.kill()
    return done


def lora_tensors(run: RunDir) -> dict[str, torch.Tensor]:
    return load_file(str(run.root / LORA))


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)) for k in a)


def metric_steps(run: RunDir) -> list[int]:
    with open(run.train / "metrics.csv") as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


def _loss_diff(a: RunDir, b: RunDir) -> float:
    """The largest relative difference of the logged global-batch loss, step by step."""
    rows = []
    for run in (a, b):
        with open(run.train / "metrics.csv") as f:
            rows.append([float(r["loss"]) for r in csv.DictReader(f)])
    assert len(rows[0]) == len(rows[1])
    return max(abs(x - y) / abs(y) for x, y in zip(*rows, strict=True))


@pytest.fixture(scope="module")
def two_process_run(demo_run, tmp_path_factory) -> RunDir:
    """2 processes × batch 1, a checkpoint after nearly every step (checkpoint_minutes tiny)."""
    run = _copy_run(demo_run, tmp_path_factory.mktemp("ddp") / "two")
    ranks = train_ranks(run, 2, steps=STEPS, batch_size=1, checkpoint_every=1000, checkpoint_minutes=1e-4)
    for rank, p in enumerate(ranks):
        assert p.returncode == 0, f"rank {rank}:\n{p.stderr[-4000:]}"
    return run


def test_two_processes_with_a_checkpoint_every_step_match_one_process_with_the_doubled_batch(
        two_process_run, demo_run, tmp_path):
    run = two_process_run
    assert metric_steps(run) == list(range(1, STEPS + 1))
    summary = json.loads((run.root / "manifest.json").read_text())["stages"]["train"]["summary"]
    assert (summary["world_size"], summary["global_batch"], summary["accumulate"]) == (2, 2, 1)
    ckpt = torch.load(sorted((run.train / "checkpoints").glob("*.ckpt"))[-1], weights_only=True)
    assert ckpt["kolora"]["batch"] == {"per_rank_batch": 1, "world_size": 2, "accumulate": 1, "global_batch": 2}

    one = _copy_run(demo_run, tmp_path / "one")
    [p] = train_ranks(one, 1, steps=STEPS, batch_size=2, checkpoint_every=1000)
    assert p.returncode == 0, p.stderr[-4000:]
    diff, loss = max_rel_diff(lora_tensors(run), lora_tensors(one)), _loss_diff(run, one)
    print(f"\n2 processes × batch 1 vs 1 process × batch 2, {STEPS} steps: LoRA max relative |Δ| {diff:.2e}, "
          f"loss {loss:.2e}")
    assert diff <= TOLERANCE and loss <= LOSS_TOLERANCE


def test_a_stop_on_rank_0_stops_every_rank_and_resumes_on_one_process(two_process_run, demo_run, tmp_path):
    run = _copy_run(demo_run, tmp_path / "elastic")
    ranks = train_ranks(run, 2, steps=STEPS, batch_size=1, checkpoint_every=4, stop_rank0_at=6)
    # only rank 0 was asked to stop; both stopped after the same step (6), with one checkpoint
    assert [p.returncode for p in ranks] == [75, 75], [p.stderr[-3000:] for p in ranks]
    assert all("training stopped at step 6/12" in p.stderr for p in ranks)
    assert sorted(p.name for p in (run.train / "checkpoints").glob("*.ckpt"))[-1] == "step=000006.ckpt"
    # each rank's RNG states, by global rank (a CUDA run keeps each rank's own GPU's generator there)
    ckpt = torch.load(run.train / "checkpoints" / "step=000006.ckpt", weights_only=True)
    assert len(ckpt["kolora"]["rng_ranks"]) == 2

    # the next allocation has one GPU: 2 micro-batches of 1 per step keep the global batch of 2
    [p] = train_ranks(run, 1, steps=STEPS, batch_size=1, checkpoint_every=4)
    assert p.returncode == 0, p.stderr[-4000:]
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert (summary["resumed_from_step"], summary["world_size"], summary["accumulate"]) == (6, 1, 2)
    assert "RNG states of 2 ranks and 1 resume: the states of ranks 1–1 are dropped" in p.stderr
    assert metric_steps(run) == list(range(1, STEPS + 1))
    diff, loss = max_rel_diff(lora_tensors(run), lora_tensors(two_process_run)), _loss_diff(run, two_process_run)
    print(f"\n2 processes, stopped at step 6, resumed on 1 process (accumulation 2): LoRA max relative |Δ| "
          f"{diff:.2e}, loss {loss:.2e}")
    assert diff <= TOLERANCE and loss <= LOSS_TOLERANCE

    # a GPU count that cannot keep the global batch of 2 is refused, naming what differs
    with pytest.raises(InputError, match="global batch of 2"):
        distributed.GlobalBatch.resumed(json.loads((run.train / distributed.BATCH_FILE).read_text()), 1, 3, "x")
