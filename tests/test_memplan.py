"""kolora.memplan: each GPU stage's peak memory from the model's configs on the meta device (no weights, no GPU),
and the jobs.<job>.gpu_mem_gb check of `kolora validate --cluster` and `kolora submit`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kolora import memplan
from kolora.cli import main
from kolora.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
KOLORS = str(REPO / "configs" / "kolors-anime.yaml")
DEMO = str(REPO / "configs" / "demo.yaml")
LOCAL = REPO / "slurm" / "clusters" / "local.yaml"
GIB = 2**30


@pytest.fixture(scope="module")
def kolors_configs(tmp_path_factory) -> Path:
    """Kolors-diffusers' layout with its configs and no weights: the packaged Kolors UNet and SDXL VAE configs
    (the VAE as diffusers saves the SDXL one, force_upcast on), ChatGLM3-6B's shape (diffusers' ChatGLMConfig
    defaults + Kolors' 2-group multi-query attention, as bench/_common.py builds it), and the empty tokenizer.model
    that models.resolve asks to exist. Nothing else is read on the meta device."""
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig

    from kolora.models import packaged_config

    root = tmp_path_factory.mktemp("kolors-configs")
    for part in ("unet", "vae", "text_encoder", "tokenizer"):
        (root / part).mkdir()
    (root / "model_index.json").write_text(json.dumps({"_class_name": "KolorsPipeline"}))
    (root / "unet" / "config.json").write_text(json.dumps(packaged_config("kolors-unet-config.json")))
    (root / "vae" / "config.json").write_text(json.dumps({**packaged_config("sdxl-vae-config.json"),
                                                         "force_upcast": True}))
    ChatGLMConfig(multi_query_attention=True, multi_query_group_num=2, add_qkv_bias=True, original_rope=True,
                  use_cache=True).save_pretrained(str(root / "text_encoder"))
    (root / "tokenizer" / "tokenizer.model").write_bytes(b"")
    return root


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

    keys = {k: memplan._key(c) for k, c in memplan.model_configs(cfg.model).items()}
    unet, text = memplan.param_count("unet", keys["unet"]), memplan.param_count("text_encoder", keys["text_encoder"])
    assert abs(unet / 2.58e9 - 1) < 0.01, unet
    assert abs(text / 6.2e9 - 1) < 0.02, text  # ChatGLM3-6B: 6.24 B with the unused output layer
    assert memplan.param_count("vae", keys["vae"]) == 83_653_863  # the SDXL VAE
    train = est["train"]
    assert train.weights == pytest.approx(unet * 2 / GIB)  # fp16 base
    # peft's count (add_lora on the meta UNet) = rank · (in + out) summed over the Linears the targets name
    import torch

    linears = [m for name, m in memplan._build("unet", keys["unet"]).named_modules()
               if isinstance(m, torch.nn.Linear) and name.endswith(("to_q", "to_k", "to_v", "to_out.0"))]
    assert len(linears) == 560  # 70 transformer blocks × 2 attentions × 4
    assert train.lora_params == 16 * sum(m.in_features + m.out_features for m in linears) == 23_224_320
    assert train.trainable == pytest.approx(train.lora_params * 16 / GIB)  # fp32 weight + grad + 2 AdamW states
    # Published SDXL figures (the same UNet size; Kolors adds a 4096→2048 text projection and reads 256 instead of
    # 77 tokens): kohya-ss/sd-scripts docs/train_SDXL-en.md: LoRA training "can be done with 8GB GPU memory (10GB
    # recommended)" training the U-Net only with gradient checkpointing and cached text-encoder outputs and
    # latents (8-bit optimizer, rank 4-8 for 8 GB); SimpleTuner TUTORIAL.md: "for LoRA ... you can get by with a
    # 12G or 16G GPU"; Civitai's SDXL 1.0 Training Overview: peaks of 13-14.8 GB with gradient checkpointing
    # (settings not given). So: above the fp16 weights, within kohya's recommended 10 GB for this cached recipe.
    assert 6.0 <= train.total_gib <= 10.0, train.describe()
    assert train.activations < 2.0  # checkpointing keeps block inputs and one block's recomputation
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


# (b) --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, direction", [
    ("train.gradient_checkpointing=false", +1), ("train.batch_size=4", +1), ("train.resolution=512", -1),
    ("train.precision=32", +1),
])
def test_the_estimate_moves_the_right_way(kolors_configs: Path, change: str, direction: int) -> None:
    base = memplan.estimate(kolors(kolors_configs))["train"]
    other = memplan.estimate(kolors(kolors_configs, change))["train"]
    assert (other.total_gib - base.total_gib) * direction > 0.1, (change, base.describe(), other.describe())
    assert (other.activations - base.activations) * direction > 0, (change, base.describe(), other.describe())


def test_the_tracker_sees_what_autograd_keeps(kolors_configs: Path) -> None:
    """Without checkpointing, the peak of a training step is what the forward saves for backward plus the first
    gradients: the live-storage tracker must not see less than autograd's own record (saved_tensors_hooks), and
    not much more."""
    import torch

    from kolora.lora import add_lora

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
    from kolora.models import tiny_diffsynth_overrides

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
    from kolora.cluster import load_profile

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
