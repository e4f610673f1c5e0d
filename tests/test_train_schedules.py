"""Learning-rate schedules (train.lr_scheduler, diffusers' get_scheduler) and the Prodigy optimizer: each changes
the lr column of metrics.csv and the trained LoRA, resumes bit-identical, and a schedule shaped by train.steps
refuses a checkpoint built for another total."""

from __future__ import annotations

import csv
import hashlib

import pytest
import torch
from conftest import DEMO
from diffusers.optimization import get_scheduler
from safetensors import safe_open
from test_train import fresh_train_run, stop_at

from kolora.core import interrupt
from kolora.core.config import TrainConfig, load_config
from kolora.core.errors import ConfigError, InputError
from kolora.pipeline.runner import run_stage
from kolora.train import loop as train_mod
from kolora.train.checkpoint import checkpoints

STEPS = 6
SCHEDULES = {"constant_with_warmup": {}, "cosine": {}, "linear": {}, "cosine_with_restarts": {"lr_num_cycles": 2},
             "polynomial": {"lr_power": 2.0}}


def _sha(p) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _lora(run):
    return run.lora / "pytorch_lora_weights.safetensors"


def _lrs(run) -> list[float]:
    with open(run.train / "metrics.csv") as f:
        return [float(r["lr"]) for r in csv.DictReader(f)]


def _train(demo_run, tmp_path, name, steps=STEPS, **options):
    run, cfg = fresh_train_run(demo_run, tmp_path, name)
    cfg.train.steps = steps
    for k, v in options.items():  # lr_scheduler first: the other schedule fields are checked against it
        setattr(cfg.train, k, v)
    return run, cfg


def _expected_lrs(lr: float, name: str, steps: int, warmup: int, **kw) -> list[float]:
    """The lr of optimizer steps 1..steps as diffusers' own schedule gives them."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=steps,
                          num_cycles=kw.get("lr_num_cycles", 1), power=kw.get("lr_power", 1.0))
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.fixture(scope="module")
def constant(demo_run, tmp_path_factory):
    run, cfg = _train(demo_run, tmp_path_factory.mktemp("constant"), "constant")
    run_stage("train", cfg, run)
    return run


# ---- config: off by default, nothing ignored silently --------------------------------------------------------
def test_defaults_stay_out_of_digests_and_keys_and_options_go_into_the_metadata(demo_run, tiny_diffusers):
    from kolora.core.rundir import RunDir
    from kolora.pipeline.keys import Keys

    model = f"model.path={tiny_diffusers}"
    default = load_config(DEMO, [model])
    explicit = load_config(DEMO, [model, "train.lr_scheduler=constant", "train.warmup_steps=0",
                                  "train.lr_num_cycles=1", "train.lr_power=1.0"])
    assert explicit.digest() == default.digest()
    assert not {"lr_scheduler", "warmup_steps", "lr_num_cycles", "lr_power"} & set(explicit.model_dump()["train"])
    fields = Keys(explicit, RunDir(demo_run)).inputs("train")["fields"]
    assert not [f for f in fields if f.startswith(("train.lr_", "train.warmup"))]
    cosine = load_config(DEMO, [model, "train.lr_scheduler=cosine", "train.warmup_steps=3"])
    fields = Keys(cosine, RunDir(demo_run)).inputs("train")["fields"]
    assert (fields["train.lr_scheduler"], fields["train.warmup_steps"]) == ("cosine", 3)
    assert train_mod.option_metadata(cosine.train) == {"kolora.lr_scheduler": "cosine", "kolora.warmup_steps": "3"}
    assert train_mod.option_metadata(default.train) == {}


@pytest.mark.parametrize(("setting", "says"), [
    ("train.warmup_steps=5", "train.warmup_steps: 5 has no effect with train.lr_scheduler: constant"),
    ("train.lr_num_cycles=3", "set train.lr_scheduler: cosine_with_restarts"),
    ("train.lr_power=2", "set train.lr_scheduler: polynomial"),
])
def test_a_schedule_option_its_schedule_ignores_is_refused(tiny_diffusers, setting, says):
    with pytest.raises(ConfigError, match=says):
        load_config(DEMO, [f"model.path={tiny_diffusers}", setting])


# ---- each schedule does what diffusers says ----------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_each_schedule_sets_the_lr_of_every_step_and_changes_the_lora(demo_run, tmp_path, constant, name):
    run, cfg = _train(demo_run, tmp_path, name, lr_scheduler=name, warmup_steps=2, **SCHEDULES[name])
    run_stage("train", cfg, run)
    lr = cfg.train.lr
    want = _expected_lrs(lr, name, STEPS, 2, **SCHEDULES[name])
    assert _lrs(run) == pytest.approx(want, rel=1e-5)  # metrics.csv: the lr each step trained with
    assert want[0] == 0 and want[1] == lr / 2  # the warmup ramps from 0 (step 1 leaves the LoRA as it was)
    if name in ("cosine", "linear", "polynomial"):
        assert want[-1] < lr / 2  # decayed
    if name == "cosine_with_restarts":
        assert any(b > a for a, b in zip(want[2:], want[3:], strict=False))  # after the warmup: a restart
    assert _lrs(constant) == [lr] * STEPS
    assert _sha(_lora(run)) != _sha(_lora(constant))
    with safe_open(str(_lora(run)), framework="pt") as f:
        assert f.metadata()["kolora.lr_scheduler"] == name


# ---- Prodigy -----------------------------------------------------------------------------------------------
def test_prodigy_missing_is_refused_before_anything_runs(tmp_path, tiny_diffusers, capsys, monkeypatch):
    import sys

    from kolora.cli.main import main

    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # `import prodigyopt` raises ImportError
    with pytest.raises(InputError, match=r"train.optimizer: prodigy needs the prodigyopt package.*pip install "
                                         r"prodigyopt\) or use train.optimizer: adamw"):
        train_mod.check_options(TrainConfig(optimizer="prodigy"), "cpu")
    rc = main(["run", str(DEMO), "--runs-dir", str(tmp_path), "--set", f"model.path={tiny_diffusers}",
               "--set", "train.optimizer=prodigy", "--set", "train.lr=1"])
    assert rc == 2 and "pip install prodigyopt" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def test_prodigy_with_an_adamw_lr_is_warned_about():
    assert not train_mod.option_warnings(TrainConfig(optimizer="prodigy", lr=1.0))
    assert not train_mod.option_warnings(TrainConfig(optimizer="adamw", lr=1e-4))
    (warning,) = train_mod.option_warnings(TrainConfig(optimizer="prodigy", lr=1e-4))
    assert "train.lr 0.0001" in warning and "train.lr: 1.0" in warning


# ---- exact resume with a schedule or Prodigy ---------------------------------------------------------------
# lr 10: Prodigy's step size estimate d (which grows with lr) leaves its initial d0 within these 6 steps
@pytest.mark.parametrize("options", [{"optimizer": "prodigy", "lr": 10.0},
                                     {"lr_scheduler": "cosine", "warmup_steps": 3}], ids=["prodigy", "cosine"])
def test_interrupted_and_resumed_ends_bit_identical(demo_run, tmp_path, monkeypatch, constant, options):
    ref, ref_cfg = _train(demo_run, tmp_path, "ref", **options)
    run_stage("train", ref_cfg, ref)
    assert _sha(_lora(ref)) != _sha(_lora(constant))  # the AdamW / constant-lr run of as many steps
    run, cfg = _train(demo_run, tmp_path, "stopped", **options)
    stop_at(monkeypatch, {3})  # inside the warmup; before Prodigy's d grows (from what it accumulated so far)
    with pytest.raises(interrupt.Interrupted):
        run_stage("train", cfg, run)
    interrupt.clear()
    state = torch.load(checkpoints(run.train / "checkpoints")[0][1], map_location="cpu", weights_only=True)
    assert state["kolora"]["schedule_steps"] == STEPS
    if "optimizer" in options:  # Prodigy's estimate (d and its running sums) travels in its param group
        group = state["optimizer_states"][0]["param_groups"][0]
        assert group["k"] == 3 and group["d_numerator"] != 0 and group["d"] == group["d0"]
        final = torch.load(checkpoints(ref.train / "checkpoints")[0][1], map_location="cpu", weights_only=True)
        assert final["optimizer_states"][0]["param_groups"][0]["d"] > group["d0"]
    else:
        assert state["lr_schedulers"][0]["last_epoch"] == 3
    assert run_stage("train", cfg, run)["resumed_from_step"] == 3
    assert _sha(_lora(run)) == _sha(_lora(ref))
    assert _lrs(run) == _lrs(ref)


# ---- train.steps and a schedule shaped by it ---------------------------------------------------------------
def test_changing_steps_under_cosine_is_refused_and_under_constant_with_warmup_continues(demo_run, tmp_path):
    run, cfg = _train(demo_run, tmp_path, "cosine", lr_scheduler="cosine", warmup_steps=1)
    cfg.train.checkpoint_every = 2  # checkpoints at steps 4 and 6 kept
    run_stage("train", cfg, run)
    lora = _sha(_lora(run))
    for steps in (8, 4):  # raised: a new total; lowered: step 4's checkpoint was on the way to 6
        cfg.train.steps = steps
        with pytest.raises(InputError) as refused:
            run_stage("train", cfg, run)
        said = str(refused.value)
        assert f"train.steps: {steps}" in said and "train.lr_scheduler: cosine over 6 steps" in said
        assert "Keep train.steps: 6" in said and "--force" in said and "constant_with_warmup" in said
    assert _sha(_lora(run)) == lora and [s for s, _ in checkpoints(run.train / "checkpoints")] == [6, 4]

    run, cfg = _train(demo_run, tmp_path, "warmup", lr_scheduler="constant_with_warmup", warmup_steps=2)
    run_stage("train", cfg, run)
    cfg.train.steps = 8
    assert run_stage("train", cfg, run)["resumed_from_step"] == STEPS
    assert _lrs(run) == pytest.approx(_expected_lrs(cfg.train.lr, "constant_with_warmup", 8, 2), rel=1e-5)
