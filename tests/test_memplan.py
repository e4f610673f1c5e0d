"""kolora.launch.memplan: each GPU stage's peak memory from the model's configs on the meta device (no weights, no GPU),
and the jobs.<job>.gpu_mem_gb check of `kolora validate --cluster` and `kolora submit`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kolora.cli.main import main
from kolora.core.config import load_config
from kolora.core.errors import ConfigError
from kolora.launch import memplan

REPO = Path(__file__).resolve().parents[1]
KOLORS = str(REPO / "configs" / "kolors-anime.yaml")
DEMO = str(REPO / "configs" / "demo.yaml")
LOCAL = REPO / "slurm" / "clusters" / "local.yaml"
GIB = 2**30


def kolors_sets(folder: Path, *more: str) -> list[str]:
    """The tutorial's recipe (configs/kolors-anime.yaml: 1024², 16-mixed, checkpointing, batch 1, rank 16,
    256 tokens, cfg 4) on the config-only model; synthetic data, since the dataset is not here."""
    return [f"model.path={folder}", "model.vae_path=null", "data.source=synthetic", *more]


def kolors(folder: Path, *more: str):
    return load_config(KOLORS, kolors_sets(folder, *more))


def profile(tmp_path: Path, train_gb: float | None, render_gb: float | None = 80) -> Path:
    data = yaml.safe_load(LOCAL.read_text())
    for job, gb in (("train", train_gb), ("render", render_gb)):
        if gb is not None:
            data["jobs"][job]["gpu_mem_gb"] = gb
    path = tmp_path / f"p-{train_gb}-{render_gb}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# (a) --------------------------------------------------------------------------------------------------------
def test_real_kolors_at_1024(kolors_configs: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = kolors(kolors_configs)
    est = memplan.estimate(cfg)
    with capsys.disabled():
        print("\nKolors, configs/kolors-anime.yaml (1024², 16-mixed, checkpointing, batch 1, LoRA r16, 256 tokens):")
        for stage, e in est.items():
            print(f"  {stage:<6} {e.describe()}  [{e.assumptions}]")
        for name, phase in est["train"].phases.items():
            print(f"         train · {name}: {phase.describe()}")

    keys = {k: memplan._key(c) for k, c in memplan.model_configs(cfg.model).items()}
    unet, text = memplan.param_count("unet", keys["unet"]), memplan.param_count("text_encoder", keys["text_encoder"])
    assert abs(unet / 2.58e9 - 1) < 0.01, unet
    assert abs(text / 6.2e9 - 1) < 0.02, text  # ChatGLM3-6B: 6.24 B with the unused output layer
    assert memplan.param_count("vae", keys["vae"]) == 83_653_863  # the SDXL VAE
    train = est["train"]
    step = train.phases["train step"]
    assert step.weights == pytest.approx(unet * 2 / GIB)  # fp16 base
    # peft's count (add_lora on the meta UNet) = rank · (in + out) summed over the Linears the targets name
    import torch

    linears = [m for name, m in memplan._build("unet", keys["unet"]).named_modules()
               if isinstance(m, torch.nn.Linear) and name.endswith(("to_q", "to_k", "to_v", "to_out.0"))]
    assert len(linears) == 560  # 70 transformer blocks × 2 attentions × 4
    assert train.lora_params == 16 * sum(m.in_features + m.out_features for m in linears) == 23_224_320
    # fp32 weight + grad + 2 AdamW states, resident through every phase
    assert all(p.trainable == pytest.approx(train.lora_params * 16 / GIB) for p in train.phases.values())
    # Published SDXL figures (the same UNet size; Kolors adds a 4096→2048 text projection and reads 256 instead of
    # 77 tokens): kohya-ss/sd-scripts docs/train_SDXL-en.md: LoRA training "can be done with 8GB GPU memory (10GB
    # recommended)" training the U-Net only with gradient checkpointing and cached text-encoder outputs and
    # latents (8-bit optimizer, rank 4-8 for 8 GB); SimpleTuner TUTORIAL.md: "for LoRA ... you can get by with a
    # 12G or 16G GPU"; Civitai's SDXL 1.0 Training Overview: peaks of 13-14.8 GB with gradient checkpointing
    # (settings not given). So: above the fp16 weights, within kohya's recommended 10 GB for this cached recipe.
    assert 6.0 <= step.total_gib <= 10.0, train.describe()
    assert step.activations < 2.0  # checkpointing keeps block inputs and one block's recomputation
    # cache: ChatGLM3 in fp16 (12.5 GB of weights) is the larger phase; the fp32 VAE encoder on 4 images of 1024²
    # holds several 128-channel 1024² maps at once
    cache = est["cache"]
    assert cache.weights == pytest.approx(text * 2 / GIB) and 12.0 < cache.total_gib < 15.0
    assert 5.0 < cache.parts["VAE encoder phase"] < cache.parts["text encoder phase"]
    # render: the text encoder alone first (its phase is the peak), freed, then UNet + LoRA (fp16) and the VAE
    # upcast to fp32 for decoding: the fp32 VAE decoder at 1024² is that phase's largest activation (its
    # 128-channel maps at full resolution), not the UNet at batch 2. Both phases fit a 24 GB card.
    render = est["render"]
    assert render.weights == pytest.approx(text * 2 / GIB)
    assert "largest activations: VAE decoder" in render.assumptions
    image = render.parts["image phase"]
    assert (unet + est["train"].lora_params) * 2 / GIB + 83_653_863 * 4 / GIB + 1.0 < image < render.total_gib
    assert 12.0 < render.total_gib < 16.0 and image < 16.0, render.describe()
    # the recipe samples validation images at 1024² (cfg 4) with the VAE in cache.vae_dtype (fp32): that phase
    # holds what render's image phase holds (UNet fp16, VAE fp32, the fp32 VAE decoder at 1024² its largest
    # activation) with the LoRA in fp32 beside its gradients and AdamW states instead of in fp16; it is the peak
    sample = train.phases["validation sample"]
    assert sample.total_gib == pytest.approx(image + train.lora_params * (16 - 2) / GIB)
    assert train.peak_phase == "validation sample" and train.total_gib == sample.total_gib > step.total_gib


# (b) --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, direction", [
    ("train.gradient_checkpointing=false", +1), ("train.batch_size=4", +1), ("train.resolution=512", -1),
    ("train.precision=32", +1),
])
def test_the_estimate_moves_the_right_way(kolors_configs: Path, change: str, direction: int) -> None:
    base = memplan.estimate(kolors(kolors_configs))["train"].phases["train step"]
    other = memplan.estimate(kolors(kolors_configs, change))["train"].phases["train step"]
    assert (other.total_gib - base.total_gib) * direction > 0.1, (change, base.describe(), other.describe())
    assert (other.activations - base.activations) * direction > 0, (change, base.describe(), other.describe())


def test_the_tracker_sees_what_autograd_keeps(kolors_configs: Path) -> None:
    """Without checkpointing, the peak of a training step is what the forward saves for backward plus the first
    gradients: the live-storage tracker must not see less than autograd's own record (saved_tensors_hooks), and
    not much more."""
    import torch

    from kolora.formats.lora import add_lora

    key = memplan._key(memplan.model_configs(kolors(kolors_configs).model)["unet"])
    peak = memplan.train_activation_bytes(key, "float16", True, False, 1, 1024, 256, 16,
                                          ("to_q", "to_k", "to_v", "to_out.0"))
    unet = memplan._build("unet", key).to(torch.float16).train().requires_grad_(False)
    add_lora(unet, 16, 1.0, ["to_q", "to_k", "to_v", "to_out.0"])
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    weights = {id(p.untyped_storage()) for p in unet.parameters()}
    held = [p.untyped_storage() for p in unet.parameters()]  # noqa: F841 - their ids stay theirs
    saved: dict[int, int] = {}

    def pack(t):
        if id(t.untyped_storage()) not in weights:
            saved[id(t.untyped_storage())] = t.untyped_storage().nbytes()
        return t

    with memplan._simulated_cuda(torch.float16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        memplan._unet_call(unet, 1, 1024, 1024, 256, torch.float32)
    assert sum(saved.values()) <= peak <= 1.2 * sum(saved.values()), (sum(saved.values()) / GIB, peak / GIB)


# (f) each phase of training ------------------------------------------------------------------------------------
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def test_validation_sampling_raises_the_train_figure_by_its_phase(kolors_configs: Path) -> None:
    """The recipe samples every 100 steps at 1024² (cfg 4): the UNet, LoRA, gradients and AdamW states stay on the
    GPU while the sampler brings the VAE there (in cache.vae_dtype, fp32) and runs the UNet at batch 2 without
    grad, then the VAE decoder."""
    on = memplan.estimate(kolors(kolors_configs))["train"]
    off = memplan.estimate(kolors(kolors_configs, "train.validation.every=0"))["train"]
    assert on.total_gib > off.total_gib + 1.0, (on.describe(), off.describe())
    step, sample, save = (on.phases[name] for name in ("train step", "validation sample", "checkpoint save"))
    assert list(off.phases) == ["train step", "checkpoint save"] and off.phases["train step"] == step
    # raised by exactly the sampling phase's excess over the step; the figure is the largest phase, named
    assert on.total_gib - off.total_gib == pytest.approx(sample.total_gib - step.total_gib)
    assert on.peak_phase == "validation sample" and on.total_gib == max(p.total_gib for p in on.phases.values())
    confs = memplan.model_configs(kolors(kolors_configs).model)
    unet_key, vae_key = memplan._key(confs["unet"]), memplan._key(confs["vae"])
    assert sample.weights == pytest.approx(step.weights + memplan.param_count("vae", vae_key) * 4 / GIB)
    assert sample.trainable == step.trainable
    unet_sampling = memplan.sampling_activation_bytes(unet_key, "float16", 2, 1024, 256, 16, TARGETS)
    vae_decoder = memplan.inference_bytes("vae_decode", vae_key, "float32", 1, 1024, 1024)
    assert sample.activations == pytest.approx(max(unet_sampling, vae_decoder) / GIB)
    # saving a checkpoint holds the resident state only (torch.save copies each GPU tensor to host memory)
    assert (save.weights, save.trainable, save.activations) == (step.weights, step.trainable, 0.0)
    # sampling at 256² needs less than a training step at 1024²: the step stays the peak, the figure is off's
    small = memplan.estimate(kolors(kolors_configs, "train.validation.size=256"))["train"]
    assert small.phases["validation sample"].total_gib < step.total_gib
    assert small.peak_phase == "train step" and small.total_gib == off.total_gib


def _targeted_linears(unet_key: str) -> list:
    import torch

    return [m for name, m in memplan._build("unet", unet_key).named_modules()
            if isinstance(m, torch.nn.Linear) and name.endswith(TARGETS)]


@pytest.mark.parametrize("change", ["train.dora=true", "train.ema_decay=0.999", "train.optimizer=adamw8bit"])
def test_what_training_keeps_on_the_gpu_moves_every_phase(kolors_configs: Path, change: str) -> None:
    """DoRA trains a magnitude per output channel of every adapted Linear (peft's lora_magnitude_vector) like the
    LoRA matrices: fp32 weight, gradient, two AdamW states. The EMA keeps an fp32 copy of the trainable tensors on
    their device. 8-bit AdamW keeps 2 bytes of state per parameter instead of 8."""
    base = memplan.estimate(kolors(kolors_configs))["train"]
    other = memplan.estimate(kolors(kolors_configs, change))["train"]
    unet_key = memplan._key(memplan.model_configs(kolors(kolors_configs).model)["unet"])
    magnitudes = sum(m.out_features for m in _targeted_linears(unet_key))
    resident = {"train.dora=true": magnitudes * 16, "train.ema_decay=0.999": base.lora_params * 4,
                "train.optimizer=adamw8bit": -base.lora_params * 6}[change] / GIB
    # the figure moves by the resident bytes (and by what DoRA's forward adds to the peak phase's activations)
    assert other.total_gib - base.total_gib == pytest.approx(resident + other.activations - base.activations)
    assert (other.total_gib - base.total_gib) * resident > 0 and other.activations >= base.activations
    assert other.lora_params == base.lora_params + (magnitudes if change == "train.dora=true" else 0)
    assert list(other.phases) == list(base.phases) and other.peak_phase == base.peak_phase
    for name, phase in base.phases.items():
        assert other.phases[name].trainable - phase.trainable == pytest.approx(resident), name
    assert other.phases["checkpoint save"].total_gib - base.phases["checkpoint save"].total_gib == \
        pytest.approx(resident)


def test_the_batch_and_the_largest_bucket_enter_the_train_step(tmp_path: Path) -> None:
    from kolora.cache import buckets
    from kolora.models import kolors as models
    sets = [f"model.path={tmp_path / 'not-built'}", "train.validation.every=10"]  # the tiny demo, sampling
    base = memplan.estimate(load_config(DEMO, sets))["train"]
    # buckets (sampling off, so the step is the figure): the step is measured at the bucket whose UNet feature
    # maps are largest. In the demo's 64² list that is 56×72: fewer pixels than 64², but its 7×9 latents round up
    # to 4×5 at the UNet's second resolution (the square's: 4×4)
    square = memplan.estimate(load_config(DEMO, [*sets, "train.validation.every=0"]))["train"]
    cfg = load_config(DEMO, [*sets, "train.validation.every=0", "train.buckets=true"])
    bucketed = memplan.estimate(cfg)["train"]
    assert bucketed.total_gib > square.total_gib, (bucketed.describe(), square.describe())
    t, unet_config = cfg.train, models.tiny_unet_config(models.TINY_TEXT["hidden_size"])
    sizes = buckets.for_config(cfg)
    w, h = memplan.largest_bucket(sizes, unet_config)
    assert w * h < t.resolution ** 2 and f"{w}×{h} (the largest bucket)" in bucketed.assumptions
    measured = {size: memplan.train_activation_bytes(memplan._key(unet_config), "float32", False,
                                                     t.gradient_checkpointing, t.batch_size, size[1],
                                                     cfg.cache.max_sequence_length, t.rank, tuple(t.target_modules), False,
                                                     size[0])
                for size in sizes}
    assert bucketed.phases["train step"].activations * GIB == measured[w, h] == max(measured.values())
    # the training batch: the step grows past the sampling phase (batch 2 with cfg, whatever the training batch)
    assert base.peak_phase == "validation sample"
    bigger = memplan.estimate(load_config(DEMO, [*sets, f"train.batch_size={4 * t.batch_size}"]))["train"]
    assert bigger.phases["train step"].activations > base.phases["train step"].activations
    assert bigger.phases["validation sample"] == base.phases["validation sample"]
    assert bigger.peak_phase == "train step" and bigger.total_gib > base.total_gib
    for e in (base, bigger, square, bucketed):
        assert e.total_gib == max(p.total_gib for p in e.phases.values()) == e.phases[e.peak_phase].total_gib


def test_validate_prints_each_phase_of_training_and_its_remedies(
        kolors_configs: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The recipe on a 9 GB GPU (the cache stage on the CPU, so only training is checked): sampling validation
    images at 1024² is the train stage's peak, and a smaller sampling size is a remedy."""
    sets = [x for s in kolors_sets(kolors_configs, "cache.device=cpu") for x in ("--set", s)]
    assert main(["validate", KOLORS, *sets, "--cluster", str(profile(tmp_path, 9))]) == 2
    out, err = capsys.readouterr()
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("gpu memory: train (job train): "))
    assert "does NOT fit jobs.train.gpu_mem_gb 9" in lines[at]
    phases = lines[at + 1:at + 4]
    assert [line.split(":")[0] for line in phases] == [
        "    train · train step", "    train · validation sample", "    train · checkpoint save"]
    assert [line.endswith(" ← peak") for line in phases] == [False, True, False]
    assert "VAE float32 0.31" in phases[1] and "VAE" not in phases[0] + phases[2]
    assert lines[at + 4].startswith("gpu memory: render (job render): ")
    assert "the train stage needs about " in err and "its peak in the validation sample" in err
    remedies = [line.strip()[2:] for line in err.split("the train stage needs about ")[1].splitlines()
                if line.startswith("  - ")]
    assert any(r.startswith("--set train.validation.size=768 → ") and r.endswith("(fits)") for r in remedies)


# (c) --------------------------------------------------------------------------------------------------------
def test_validate_refuses_a_gpu_too_small_and_names_the_remedies(
        kolors_configs: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sets = [x for s in kolors_sets(kolors_configs, "train.gradient_checkpointing=false", "train.batch_size=2")
            for x in ("--set", s)]
    assert main(["validate", KOLORS, *sets, "--cluster", str(profile(tmp_path, 16))]) == 2
    out, err = capsys.readouterr()
    lines = [line for line in out.splitlines() if line.startswith("gpu memory: ")]
    assert [line.split(":")[1] for line in lines] == [" cache (job train)", " train (job train)", " render (job render)"]
    assert lines[0].endswith("fits jobs.train.gpu_mem_gb 16")
    assert "does NOT fit jobs.train.gpu_mem_gb 16" in lines[1] and "fits jobs.render.gpu_mem_gb 80" in lines[2]
    assert "kolora: config error: jobs.train.gpu_mem_gb in " in err and "the train stage needs about" in err
    assert "more than the 16 GB of job train's GPU" in err
    remedies = [line.strip()[2:] for line in err.splitlines() if line.startswith("  - ")]
    # the most effective first, each estimated; a bigger GPU last; no 8-bit Adam (it would save 0.13 GiB)
    assert remedies[0].startswith("--set train.gradient_checkpointing=true → ") and remedies[0].endswith("(fits)")
    assert any(r.startswith("--set train.batch_size=1 → ") for r in remedies[1:])
    assert any(r.startswith("--set train.resolution=768 → ") for r in remedies[1:])
    totals = [float(r.split("→ ")[1].split(" GiB")[0]) for r in remedies[:-1]]
    assert totals == sorted(totals)
    assert remedies[-1].startswith("a GPU with at least ") and "jobs.train.partition / gpu_type / constraint" in \
        remedies[-1]
    assert not any("adamw8bit" in r for r in remedies)

    # the same run on a GPU that has the memory passes
    assert main(["validate", KOLORS, *sets, "--cluster", str(profile(tmp_path, 80))]) == 0
    out = capsys.readouterr().out
    assert "fits jobs.train.gpu_mem_gb 80" in out and ": OK (run kolors-anime, config " in out


def test_eight_bit_adam_is_offered_only_where_it_alone_fits(tmp_path: Path) -> None:
    from kolora.launch.plan import gpu_memory_remedies

    cfg = load_config(DEMO, [f"model.path={tmp_path / 'not-built'}"])
    train = memplan.estimate(cfg)["train"]
    saved = train.lora_params * 6 / GIB
    offered = gpu_memory_remedies(cfg, "train", train.total_gib, train.total_gib - saved / 2, "train", train.lora_params)
    assert offered[-1].startswith("--set train.optimizer=adamw8bit → ") and "(fits; bitsandbytes" in offered[-1]
    assert memplan.estimate(load_config(DEMO, [f"model.path={tmp_path / 'not-built'}", "train.optimizer=adamw8bit"])
                            )["train"].total_gib == pytest.approx(train.total_gib - saved)
    refused = gpu_memory_remedies(cfg, "train", train.total_gib, train.total_gib - 2 * saved, "train", train.lora_params)
    assert not any("adamw8bit" in r for r in refused)


# (d) --------------------------------------------------------------------------------------------------------
FAKE_SBATCH = '#!/bin/bash\necho "$@" >> "$FAKE_SLURM/sbatch.log"; echo "Submitted batch job 1001"\n'


def test_submit_dry_run_prints_the_estimates_and_submit_refuses_before_queueing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    runs = tmp_path / "runs"
    assert main(["submit", DEMO, "--cluster", str(LOCAL), "--runs-dir", str(runs), "--dry-run"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("gpu memory: ")]
    assert len(lines) == 3 and out.rstrip().endswith(lines[-1])  # after the sbatch scripts
    assert lines[0].startswith("gpu memory: cache (job train): 1.0 GiB (weights 0.0, activations 0.0, overhead 1.0")
    assert lines[1].endswith("set jobs.train.gpu_mem_gb to check")
    assert lines[2].endswith("set jobs.render.gpu_mem_gb to check")

    fake = tmp_path / "fake-slurm"
    fake.mkdir()
    for name in ("sbatch", "srun", "squeue", "scancel"):
        (fake / name).write_text(FAKE_SBATCH if name == "sbatch" else "#!/bin/bash\nexit 0\n")
        (fake / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:/usr/bin:/bin")
    monkeypatch.setenv("FAKE_SLURM", str(fake))
    tiny_gpu = profile(tmp_path, 0.5, None)  # below the fixed CUDA overhead alone
    for extra in (["--dry-run"], []):
        assert main(["submit", DEMO, "--cluster", str(tiny_gpu), "--runs-dir", str(runs), *extra]) == 2
        err = capsys.readouterr().err
        assert "jobs.train.gpu_mem_gb in " in err and "more than the 0.5 GB of job train's GPU" in err
        assert "a GPU with at least 2 GB" in err
    assert not runs.exists() and not (fake / "sbatch.log").exists()  # nothing written, nothing queued


# (e) --------------------------------------------------------------------------------------------------------
def test_the_tiny_demo_gets_small_estimates(tmp_path: Path, tiny_diffusers: Path, tiny_diffsynth: Path) -> None:
    from kolora.models.kolors import tiny_diffsynth_overrides

    not_built = memplan.estimate(load_config(DEMO, [f"model.path={tmp_path / 'not-built'}"]))
    built = memplan.estimate(load_config(DEMO, [f"model.path={tiny_diffusers}"]))
    diffsynth = memplan.estimate(load_config(DEMO, [f"model.path={tiny_diffsynth}", "model.layout=diffsynth", *(
        f"model.{k}={v}" for k, v in tiny_diffsynth_overrides(tiny_diffsynth).items())]))
    for stage in memplan.GPU_STAGES:
        e = not_built[stage]
        assert e.total_gib < memplan.OVERHEAD_GIB + 0.01 and e.weights < 0.01, e.describe()
        assert 0 < e.activations < 0.01
        # the configs on disk, in either layout, are the tiny ones
        assert built[stage].total_gib == pytest.approx(e.total_gib) == diffsynth[stage].total_gib
        assert sum(e.breakdown().values()) == pytest.approx(e.total_gib)


# the profile field --------------------------------------------------------------------------------------------
def test_gpu_mem_gb_inherits_and_is_checked(tmp_path: Path) -> None:
    from kolora.launch.cluster import load_profile

    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"name": "p", "defaults": {"gpu_mem_gb": 40},
                                    "jobs": {"train": {"gpus": 1, "gpu_mem_gb": 80}, "render": {"gpus": 1}}}))
    p = load_profile(path)
    assert (p.resources("train").gpu_mem_gb, p.resources("render").gpu_mem_gb) == (80, 40)
    assert load_profile(LOCAL).resources("train").gpu_mem_gb is None
    for bad in (0, -8, "80G", True):
        path.write_text(yaml.safe_dump({"name": "p", "jobs": {"render": {"gpu_mem_gb": bad}}}))
        with pytest.raises(ConfigError, match=r"jobs\.render\.gpu_mem_gb"):
            load_profile(path)


def test_the_lokr_recipe_is_the_anime_one_as_a_smaller_lokr_with_prodigy(kolors_configs: Path) -> None:
    """configs/kolors-anime-lokr.yaml: kolors-anime.yaml but for the adapter, optimizer and schedule; on the full-size
    Kolors UNet its LoKr trains fewer parameters than the recipe's rank-16 LoRA (what its header says)."""
    anime = load_config(KOLORS).model_dump()
    recipe = load_config(REPO / "configs" / "kolors-anime-lokr.yaml").model_dump()
    changed = {k: recipe["train"].pop(k) for k in ("adapter", "lokr_factor", "optimizer", "lr", "lr_scheduler",
                                                   "warmup_steps")}
    assert changed == {"adapter": "lokr", "lokr_factor": 8, "optimizer": "prodigy", "lr": 1.0,
                       "lr_scheduler": "cosine", "warmup_steps": 50}
    anime["train"].pop("lr"), anime["train"].pop("optimizer")
    assert recipe.pop("name") == "kolors-anime-lokr" and anime.pop("name") == "kolors-anime"
    assert recipe == anime
    lokr = memplan.estimate(load_config(REPO / "configs" / "kolors-anime-lokr.yaml", kolors_sets(kolors_configs)))
    lora = memplan.estimate(kolors(kolors_configs))
    assert 0 < lokr["train"].lora_params < lora["train"].lora_params / 4
    assert "Prodigy states" in lokr["train"].phases["train step"].detail


@pytest.mark.parametrize("precision, weight_bytes", [("32", 4), ("32-true", 4), ("16-mixed", 2), ("bf16-mixed", 2)])
def test_the_frozen_unet_counts_its_precisions_bytes_per_weight(tiny_diffusers: Path, precision: str,
                                                                 weight_bytes: int) -> None:
    """An exact figure: the tiny UNet's parameter count, read from its weights file's header, times 4 bytes in
    float32 (precision 32) and 2 in float16/bfloat16; the LoRA, its gradients and AdamW's states stay fp32."""
    import math

    from safetensors import safe_open

    with safe_open(str(tiny_diffusers / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    train = memplan.estimate(load_config(DEMO, [f"model.path={tiny_diffusers}",
                                                f"train.precision={precision}"]))["train"]
    step = train.phases["train step"]
    dtype = {4: "float32", 2: "float16" if precision == "16-mixed" else "bfloat16"}[weight_bytes]
    assert round(step.detail[f"UNet {dtype}"] * GIB) == round(step.weights * GIB) == weight_bytes * params
    assert round(step.detail["LoRA fp32"] * GIB) == 4 * train.lora_params
    assert round(step.detail["AdamW states"] * GIB) == 8 * train.lora_params
