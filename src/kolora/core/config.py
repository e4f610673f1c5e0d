"""Experiment config: a pydantic schema for the YAML recipes in configs/.

Loading resolves relative paths against the config file's folder (paths given with --set against the
current directory), applies dotted overrides, and turns every validation problem into one ConfigError
whose message names the field, what was given and what is allowed. Nothing heavy is imported here.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from kolora.core.errors import ConfigError, InputError, read_text
from kolora.core.overrides import apply_overrides, override_origin, resolve_paths
from kolora.core.schema import Section as _Section
from kolora.core.schema import Seed, describe_validation_error, format_problems


class ModelConfig(_Section):
    """Where Kolors lives on disk and in which layout."""

    layout: Literal["diffusers", "diffsynth"] = "diffusers"
    # diffusers: the Kwai-Kolors/Kolors-diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/).
    # diffsynth: the models/ folder DiffSynth's download_models(["Kolors", "SDXL-vae-fp16-fix"]) fills,
    #            or its models/kolors/Kolors subfolder.
    path: Path
    # Build tiny random Kolors-shaped weights at `path` when it does not exist yet (demo and tests only).
    tiny: bool = False
    # Optional overrides for the diffsynth layout, whose folders carry no config.json / tokenizer.
    vae_path: Path | None = None
    tokenizer_path: Path | None = None
    unet_config: Path | None = None
    vae_config: Path | None = None
    variant: str | None = None  # e.g. "fp16" for Kolors-diffusers' *.fp16.safetensors


class SyntheticConfig(_Section):
    count: int = Field(48, ge=1)
    seed: Seed = 0
    # Sizes are drawn so that both tutorial filters keep some and drop some.
    min_side: int = Field(32, ge=8)
    max_side: int = Field(160, ge=8)
    # a loss mask beside each image (<stem>_mask.png, data.mask: auto takes it): the shape at full weight, the
    # background at a quarter
    masks: bool = False

    @model_serializer(mode="wrap")
    def _omit_masks_off(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)  # off: the dataset as before the field existed (same keys, same digests)
        if not self.masks:
            data.pop("masks", None)
        return data

    @model_validator(mode="after")
    def _sides_in_order(self) -> SyntheticConfig:
        if self.min_side > self.max_side:
            raise ValueError(f"data.synthetic.min_side ({self.min_side}) is larger than max_side ({self.max_side})")
        return self


# DataConfig's captioning fields at the values that mean "the dataset's captions, as they are"
CAPTION_DEFAULTS: dict[str, Any] = {"captions": "keep", "caption_model": None, "caption_language": "en",
                                    "caption_prefix": None}

SOURCE_KINDS = Literal["synthetic", "folder", "jsonl", "parquet", "modelscope"]
# The fields one dataset is read by: data's own (one source), or each data.sources entry's
PER_SOURCE_FIELDS = ("source", "path", "dataset_id", "subset", "split", "text_column", "image_column", "caption",
                     "limit", "synthetic")


def _reads_no_path(raw: Any) -> Any:
    # generated images read nothing: a path left from another source is not an input (not checked, not bound
    # into a container, not in the config's digest or ingest's key)
    if isinstance(raw, dict) and raw.get("source", "synthetic") == "synthetic":
        return {k: v for k, v in raw.items() if k != "path"}
    return raw


def _needs(source: str, path: Path | None, dataset_id: str | None, prefix: str) -> None:
    if source in ("folder", "jsonl", "parquet") and path is None:
        raise ValueError(f"{prefix}path is required when {prefix}source is {source!r}")
    if source == "modelscope" and path is None and not dataset_id:
        raise ValueError(f"{prefix}source 'modelscope' needs {prefix}dataset_id (e.g. AI-ModelScope/lowres_anime) "
                         f"or {prefix}path (a folder made by `modelscope download --dataset ...`)")


class DatasetFields(_Section):
    """The fields one dataset is read by (PER_SOURCE_FIELDS): data's own, or each data.sources entry's."""

    source: SOURCE_KINDS = "synthetic"
    # folder: images + metadata.csv (file_name,text); jsonl: {"text":..., "image": [path]} lines;
    # parquet: a file (or folder of files) with image bytes + text; modelscope: a dataset id or a local folder.
    path: Path | None = None
    dataset_id: str | None = None
    subset: str | None = "default"
    split: str = "train"
    text_column: str = "text"
    image_column: str = "image"
    # The tutorial captions every image "二次元"; set this to do the same (overrides the dataset's text).
    caption: str | None = None
    limit: int | None = Field(None, ge=1)
    synthetic: SyntheticConfig = SyntheticConfig()


class SourceConfig(DatasetFields):
    """One dataset of data.sources: read like data's single source, plus how often it is trained on."""

    # tags its samples; default: the path's stem, the dataset id's last part or the kind
    name: str = Field(pattern=r"^[^/\\\s]+$")
    # How often each of its images appears per epoch (kohya's / OneTrainer's repeats)
    repeats: int = Field(1, ge=1)
    # Put verbatim before each of its captions (include the separator: "sks style, ")
    caption_prefix: str | None = None
    # Data-Juicer ops for this source's samples instead of filter.ops (same form); None: filter.ops
    filter_ops: list[dict[str, dict[str, Any]]] | None = None

    @field_validator("filter_ops", mode="before")
    @classmethod
    def _filter_ops_shape(cls, ops: Any) -> Any:
        if ops is None:
            return None
        ops = FilterConfig._ops_shape(ops)
        dedups = [next(iter(op)) for op in ops if next(iter(op)).endswith("deduplicator")]
        if dedups:
            raise ValueError(f"{', '.join(dedups)}: a deduplicator compares the samples of every source; put it "
                             "in filter.ops, which it then runs over all sources")
        return ops

    @model_validator(mode="before")
    @classmethod
    def _synthetic_reads_no_path(cls, raw: Any) -> Any:
        return _reads_no_path(raw)

    @model_validator(mode="after")
    def _source_needs(self) -> SourceConfig:
        _needs(self.source, self.path, self.dataset_id, "")
        return self


def _derived_name(raw: dict[str, Any]) -> str:
    if raw.get("source", "synthetic") != "synthetic" and raw.get("path"):
        return Path(str(raw["path"])).stem or str(raw.get("source"))
    if raw.get("dataset_id"):
        return str(raw["dataset_id"]).rstrip("/").rsplit("/", 1)[-1]
    return str(raw.get("source", "synthetic"))


class DataConfig(DatasetFields):
    # Image paths from metadata must resolve inside the dataset's folder; true admits others (absolute paths
    # listed on purpose). Larger files, and anything but regular files, are rejected at ingest either way.
    allow_external_paths: bool = False
    max_image_bytes: int = Field(256 * 2**20, ge=1)
    # Loss masks (kolora.cache.masks): auto = a `mask` column of the dataset's table or <image stem>_mask.png
    # beside an image, where there is one; alpha = every image's alpha channel; none = masks are ignored.
    mask: Literal["auto", "alpha", "none"] = "auto"
    # Captions from a captioning model, in the filter job (kolora.filter.captions): keep = the dataset's own
    # (a sample without one is rejected at ingest); generate = caption the samples that have none; replace =
    # caption every sample. The model: a BLIP-style captioner under scorers.dir (`kolora fetch models --captioner`),
    # data.caption_model, else the default for data.caption_language.
    captions: Literal["keep", "generate", "replace"] = "keep"
    caption_model: str | None = None
    caption_language: Literal["en", "zh"] = "en"
    # A trigger word put before every caption, the dataset's and generated ones ("<prefix>, <caption>").
    caption_prefix: str | None = Field(None, min_length=1)
    # Several datasets in one (kolora.ingest.stage), each with its own name, repeats and caption prefix; the
    # fields above that read a dataset (PER_SOURCE_FIELDS) are then set per entry. Empty: data's one source.
    sources: list[SourceConfig] = Field(default_factory=list)

    @model_serializer(mode="wrap")
    def _omit_default_mask(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # auto on a dataset without masks is training as before the field existed: left out of dumps and
        # digests, so runs made before it stay bound and their LoRAs keep their bytes. Likewise no sources.
        data = handler(self)
        if self.mask == "auto":
            data.pop("mask", None)
        for name, default in CAPTION_DEFAULTS.items():  # the captions as given: as before these fields existed
            if getattr(self, name) == default:
                data.pop(name, None)
        if not self.sources:
            data.pop("sources", None)
        return data

    @model_validator(mode="before")
    @classmethod
    def _synthetic_reads_no_path(cls, raw: Any) -> Any:
        raw = _reads_no_path(raw)
        if isinstance(raw, dict) and isinstance(raw.get("sources"), list):
            # unnamed sources are named after their dataset; a name two of them would get is numbered
            derived = [_derived_name(s) if isinstance(s, dict) and s.get("name") is None else None
                       for s in raw["sources"]]
            taken = {s.get("name") for s in raw["sources"] if isinstance(s, dict)}
            sources = []
            for s, name in zip(raw["sources"], derived, strict=True):
                if name is not None:
                    if name in taken:
                        name = next(f"{name}-{i}" for i in range(2, 10**6) if f"{name}-{i}" not in taken)
                    taken.add(name)
                    s = {**s, "name": name}
                sources.append(s)
            raw = {**raw, "sources": sources}
        return raw

    @model_validator(mode="after")
    def _one_caption_rule(self) -> DataConfig:
        if self.caption is not None and self.captions != "keep":
            raise ValueError(f"data.caption gives every image the caption {self.caption!r}, data.captions: "
                             f"{self.captions} would caption them with a model: set one of them (a fixed word before "
                             "generated captions: data.caption_prefix)")
        return self

    @model_validator(mode="after")
    def _source_needs(self) -> DataConfig:
        if self.sources:
            both = [f"data.{f}" for f in PER_SOURCE_FIELDS
                    if getattr(self, f) != DataConfig.model_fields[f].get_default(call_default_factory=True)]
            if both:
                raise ValueError(f"{', '.join(both)} and data.sources are both set: with data.sources each entry "
                                 f"names its own dataset; move {', '.join(both)} into the entries of data.sources")
            names = [s.name for s in self.sources]
            dup = next((n for n in names if names.count(n) > 1), None)
            if dup is not None:
                raise ValueError(f"data.sources: two sources are named {dup!r}; give each a different name "
                                 "(it tags the samples of its source)")
            return self
        _needs(self.source, self.path, self.dataset_id, "data.")
        return self

    def per_source(self) -> list[tuple[SourceConfig | None, DataConfig]]:
        """Each dataset to read, as (its data.sources entry, a DataConfig reading only it); one (None, self)
        without data.sources."""
        if not self.sources:
            return [(None, self)]
        return [(s, self.model_copy(update={**{f: getattr(s, f) for f in PER_SOURCE_FIELDS}, "sources": []}))
                for s in self.sources]

    def repeats(self) -> dict[str, int]:
        """{source name: repeats}; empty without data.sources."""
        return {s.name: s.repeats for s in self.sources}


def _default_ops() -> list[dict[str, dict[str, Any]]]:
    return [
        {"image_shape_filter": {"min_width": 1024, "min_height": 1024, "any_or_all": "any"}},
        {"image_aspect_ratio_filter": {"min_ratio": 0.5, "max_ratio": 2.0, "any_or_all": "any"}},
    ]


class FilterConfig(_Section):
    # A Data-Juicer `process:` list: each item is {op_name: {arguments}}.
    ops: list[dict[str, dict[str, Any]]] = Field(default_factory=_default_ops)
    np: int = Field(1, ge=1)
    executor: Literal["default", "ray"] = "default"
    # Run image_shape_filter / image_aspect_ratio_filter as kolora's header-only Data-Juicer ops
    # (kolora.filter.dj.ops: same arguments, stats and kept samples, no full decode); false runs the built-ins.
    fast_ops: bool = True
    # Contiguous slices of the samples filtered separately (a Slurm array of CPU tasks; one after another in
    # `kolora run`) and merged into the same outputs as one pass (kolora.filter.shards); a parquet or
    # ModelScope source is ingested in as many row ranges (kolora.ingest.shards).
    shards: int = Field(1, ge=1)
    # ... or as many shards as the dataset has samples per shard_size (counted at submission; when set, it
    # decides the count instead of shards)
    shard_size: int | None = Field(None, ge=1)

    @model_serializer(mode="wrap")
    def _omit_default_fast_ops(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # The swap keeps exactly the same samples, so at its default it is left out of dumps and digests:
        # runs made before the field existed stay complete. Likewise shards (same outputs).
        data = handler(self)
        if self.fast_ops:
            data.pop("fast_ops", None)
        if self.shards == 1:
            data.pop("shards", None)
        if self.shard_size is None:
            data.pop("shard_size", None)
        return data

    @model_validator(mode="after")
    def _shards_without_dedup(self) -> FilterConfig:
        # a deduplicator compares samples with each other: within a shard it would miss duplicates across shards
        # (image_deduplicator excepted: kolora's merge runs it over every shard's samples, kolora.filter.dedup)
        dedups = [next(iter(op)) for op in self.ops
                  if next(iter(op)).endswith("deduplicator") and next(iter(op)) != "image_deduplicator"]
        if (self.shards > 1 or self.shard_size is not None) and dedups:
            raise ValueError(f"sharding cannot run {', '.join(dedups)} (a deduplicator sees only its own shard's "
                             "samples); set filter.shards: 1 (no shard_size) or remove the deduplicator")
        return self

    @field_validator("ops", mode="before")
    @classmethod
    def _ops_shape(cls, ops: Any) -> Any:
        if not isinstance(ops, list):
            raise ValueError("must be a list of {op_name: {arguments}} items")
        out = []
        for i, op in enumerate(ops):
            if isinstance(op, str):  # bare op name, default arguments
                op = {op: {}}
            if not isinstance(op, dict) or len(op) != 1:
                raise ValueError(f"item {i} must be one mapping {{op_name: {{arguments}}}}, got {op!r}")
            name, args = next(iter(op.items()))
            if args is not None and not isinstance(args, dict):
                raise ValueError(f"item {i} ({name}): the arguments must be a mapping such as "
                                 f"{{min_width: 1024}}, got {args!r}")
            out.append({name: dict(args or {})})
        return out


class CacheConfig(_Section):
    max_sequence_length: int = Field(256, ge=8, le=4096)
    batch_size: int = Field(4, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # The VAE's dtype for encoding latents. The stock SDXL VAE overflows (nan) in float16; float32 is what
    # diffusers' SDXL training scripts use. float16 is safe only with the fp16-fix VAE (model.vae_path).
    vae_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    # Where the content-addressed entries live (default: <run>/cache). A lab folder shared by several runs
    # (a sweep, a rerun with another lr) means each image and caption is encoded once.
    dir: Path | None = None


class ValidationConfig(_Section):
    """Sample images with the current LoRA every `every` training steps (0: off) → train/samples/."""

    every: int = Field(0, ge=0)
    prompts: list[str] = Field(default_factory=list)  # empty: the first `count` prompts of render.prompts
    count: int = Field(2, ge=1)
    seeds: list[Seed] = Field(default_factory=lambda: [0], min_length=1)
    steps: int = Field(20, ge=1)  # sampling steps (render.cfg and render.negative_prompt apply)
    size: int | None = Field(None, ge=8, multiple_of=8)  # square side; None: train.resolution


# The schedule options at the values meaning "as before they existed" (a constant lr)
SCHEDULE_DEFAULTS: dict[str, Any] = {"lr_scheduler": "constant", "warmup_steps": 0, "lr_num_cycles": 1,
                                     "lr_power": 1.0}
# TrainConfig fields added after the first release, left out of dumps and digests at these values
OMITTED_AT_DEFAULT: dict[str, Any] = {"buckets": False, "timesteps": "per_batch", "wandb": None, **SCHEDULE_DEFAULTS,
                                      "adapter": "lora", "lokr_factor": -1, "block_ranks": {}, "block_alphas": {}}
POLYNOMIAL_END_LR = 1e-7  # diffusers' get_polynomial_decay_schedule_with_warmup's lr_end


class TrainConfig(_Section):
    rank: int = Field(16, ge=1)
    alpha: float = Field(4.0, gt=0)
    target_modules: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    lr: float = Field(1e-4, gt=0)
    steps: int = Field(500, ge=1)
    batch_size: int = Field(1, ge=1)
    resolution: int = Field(1024, ge=8)
    center_crop: bool = True
    # SDXL-style aspect-ratio buckets around resolution² pixels (kolora.cache.buckets) instead of the square crop;
    # the ratio range is filter.ops' image_aspect_ratio_filter's (else 0.5-2.0)
    buckets: bool = False
    precision: Literal["16-mixed", "bf16-mixed", "32", "32-true"] = "16-mixed"
    gradient_checkpointing: bool = True
    checkpoint_every: int = Field(100, ge=1)  # steps between checkpoints
    checkpoint_minutes: float | None = Field(None, gt=0)  # and/or wall-clock minutes between checkpoints
    keep_checkpoints: int = Field(3, ge=1)
    seed: Seed = 0
    num_workers: int = Field(0, ge=0)
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    # Deterministic algorithms (torch, cuDNN, cuBLAS workspace): what makes a resumed GPU run repeat the
    # uninterrupted one. Ops without a deterministic kernel warn instead of failing.
    deterministic: bool = True
    # The options kohya / SimpleTuner / OneTrainer users expect; all off by default (the tutorial's recipe).
    min_snr_gamma: float | None = Field(None, gt=0)  # min-SNR-γ loss weighting (5 is the paper's choice)
    noise_offset: float = Field(0.0, ge=0, le=1)  # offset noise strength (0.05-0.1 is usual)
    caption_dropout: float = Field(0.0, ge=0, lt=1)  # probability of training a sample on the empty caption
    ema_decay: float | None = Field(None, gt=0, lt=1)  # EMA of the LoRA weights, exported when set (e.g. 0.999)
    dora: bool = False  # DoRA (weight-decomposed LoRA, peft's use_dora)
    # adamw8bit: bitsandbytes, on a GPU only. prodigy (prodigyopt) estimates its own step size and train.lr
    # scales that estimate: Prodigy's convention is lr 1.0 (AdamW's 1e-4 would barely move it)
    optimizer: Literal["adamw", "adamw8bit", "prodigy"] = "adamw"
    # Learning-rate schedule by diffusers.optimization.get_scheduler's names, stepped once per optimizer step
    # (constant: the tutorial's); cosine, cosine_with_restarts, linear and polynomial are shaped by train.steps
    lr_scheduler: Literal["constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear",
                          "polynomial"] = "constant"
    warmup_steps: int = Field(0, ge=0)  # steps ramping the lr linearly from 0 (every schedule but constant)
    lr_num_cycles: int = Field(1, ge=1)  # cosine_with_restarts: the number of cosine cycles (hard restarts)
    lr_power: float = Field(1.0, gt=0)  # polynomial: the decay's exponent (1: linear) down to lr 1e-7
    # per_batch: one timestep for the whole global batch (the tutorial's DiffSynth trainer); per_sample: one per
    # sample, as diffusers' and kohya's scripts draw them (a smoother gradient at larger batches)
    timesteps: Literal["per_batch", "per_sample"] = "per_batch"
    # The adapter (peft): lora (the tutorial's), or LyCORIS' loha (Hadamard product of two low-rank pairs) or lokr
    # (Kronecker product); rank/alpha are their r/alpha. lokr_factor: LoKr's decompose_factor (-1: near √dim)
    adapter: Literal["lora", "loha", "lokr"] = "lora"
    lokr_factor: int = Field(-1, ge=-1)
    # Per-block rank / alpha (kohya's block_dims, by block index): {"down.1": 8, "mid": 16, "up.0": 4}; the
    # blocks not named keep train.rank / train.alpha (peft's rank_pattern / alpha_pattern)
    block_ranks: dict[str, int] = Field(default_factory=dict)
    block_alphas: dict[str, float] = Field(default_factory=dict)
    validation: ValidationConfig = ValidationConfig()
    wandb: str | None = None  # a wandb project to log to as well (needs the wandb package; offline in Slurm jobs)

    @field_validator("precision", mode="before")
    @classmethod
    def _unquoted_32(cls, v: Any) -> Any:
        # YAML reads an unquoted `precision: 32` as a number; it can only mean "32"
        return str(v) if isinstance(v, int) and not isinstance(v, bool) and v == 32 else v

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError("must be a multiple of 8 (the VAE downsamples 8x)")
        return v

    @field_validator("block_ranks", "block_alphas")
    @classmethod
    def _block_keys(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        # the UNet's block count is checked when the adapter is built (kolora.formats.lora.check_blocks)
        bad = [k for k in v if not re.match(r"^(?:(?:down|up)\.\d+|mid)$", k)]
        if bad:
            raise ValueError(f"block key {bad[0]!r}: use \"down.N\" (down_blocks.N), \"mid\" (mid_block) or "
                             "\"up.N\" (up_blocks.N), e.g. {\"down.1\": 8, \"mid\": 16}")
        low = [k for k, x in v.items() if not (x >= 1 if info.field_name == "block_ranks" else x > 0)]
        if low:
            raise ValueError(f"{low[0]}: {v[low[0]]}; a rank is 1 or more, an alpha a number > 0")
        return v

    @field_validator("lokr_factor")
    @classmethod
    def _factor(cls, v: int) -> int:
        if v == 0:
            raise ValueError("0; LoKr's decompose_factor is -1 (split each dimension near its square root) or >= 1")
        return v

    @model_validator(mode="after")
    def _adapter_options(self) -> TrainConfig:
        if self.dora and self.adapter != "lora":
            raise ValueError(f"train.dora and train.adapter: {self.adapter}: DoRA is a LoRA variant (peft's use_dora); "
                             "set train.dora: false, or train.adapter: lora")
        if self.lokr_factor != -1 and self.adapter != "lokr":
            raise ValueError(f"train.lokr_factor: {self.lokr_factor} is LoKr's; with train.adapter: {self.adapter} it "
                             "would be ignored: set train.adapter: lokr, or drop train.lokr_factor")
        return self

    @model_validator(mode="after")
    def _schedule_options_used(self) -> TrainConfig:
        # a value its schedule would silently ignore is a mistake, not a choice
        schedule = self.lr_scheduler
        unused = [("warmup_steps", self.warmup_steps, schedule == "constant",
                   "constant_with_warmup (or cosine, linear, ... which take a warmup too)"),
                  ("lr_num_cycles", self.lr_num_cycles, schedule != "cosine_with_restarts", "cosine_with_restarts"),
                  ("lr_power", self.lr_power, schedule != "polynomial", "polynomial")]
        for field, value, ignored, takes_it in unused:
            if ignored and value != SCHEDULE_DEFAULTS[field]:
                raise ValueError(f"train.{field}: {value:g} has no effect with train.lr_scheduler: {schedule}; "
                                 f"set train.lr_scheduler: {takes_it}, or leave train.{field} out")
        if schedule == "polynomial" and self.lr <= POLYNOMIAL_END_LR:
            raise ValueError(f"train.lr_scheduler: polynomial decays to {POLYNOMIAL_END_LR:g} (diffusers' end "
                             f"lr), which train.lr ({self.lr:g}) must exceed; raise train.lr or use linear")
        return self

    @model_serializer(mode="wrap")
    def _omit_defaults_of_later_options(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # An option at its default is training as before the option existed: left out of dumps and digests, so
        # earlier runs stay complete and a LoRA trained without it keeps its bytes (its metadata holds the digest).
        data = handler(self)
        for field, default in OMITTED_AT_DEFAULT.items():
            if getattr(self, field) == default:
                data.pop(field, None)
        if self.validation == ValidationConfig():  # validation samples do not change the LoRA's bytes either
            data.pop("validation", None)
        return data


class RenderConfig(_Section):
    prompts: Path
    cfg: float = Field(4.0, ge=0)
    steps: int = Field(50, ge=1)
    width: int = Field(1024, ge=8)
    height: int = Field(1024, ge=8)
    negative_prompt: str = "丑陋、变形、嘈杂、模糊、低对比度"
    # Render with this LoRA instead of the run's own lora/ (another lab's adapter); None = the trained one.
    lora: Path | None = None
    lora_scale: float = 1.0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    # Also render every (prompt, seed) with the base model (no LoRA) into render/base/, for evaluate's
    # comparison; None: when evaluate.enabled.
    base_tiles: bool | None = None

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError("must be a multiple of 8")
        return v


class GridConfig(_Section):
    columns: int = Field(2, ge=1)
    rows: int = Field(4, ge=1)
    captions: Literal["none", "seed", "prompt"] = "none"
    tile_size: int | None = Field(None, ge=8)  # resize tiles to this square size; None keeps them as rendered
    font: Path | None = None  # a TrueType font with CJK glyphs for prompt captions


REWARD_DEFAULTS: dict[str, Any] = {"rewards": [], "pickscore": "yuvalkirstain/PickScore_v1",
                                   "pickscore_processor": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                                   "hps": "xswu/HPSv2", "hps_version": "v2.1", "imagereward": "THUDM/ImageReward"}


class ScorersConfig(_Section):
    """Local CLIP / Chinese-CLIP / aesthetic models (kolora.models.scorers) for filter ops and evaluate."""

    # Data-Juicer's external models home: <dir>/<hub id>/ (`kolora fetch models --clip --aesthetics --to DIR`)
    dir: Path | None = None
    # Build tiny random scorer models in `dir` when missing (demo and tests only).
    tiny: bool = False
    clip: str = "openai/clip-vit-base-patch32"  # English text
    chinese_clip: str = "OFA-Sys/chinese-clip-vit-base-patch16"  # Chinese text
    aesthetic: str = "shunk031/aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE"
    # Which CLIP scores a text: auto = Chinese-CLIP when CJK ideographs are ≥ 1/5 of its letters, else CLIP.
    language: Literal["auto", "zh", "en"] = "auto"
    # Reward models evaluate also scores every tile with (kolora.models.scorers.REWARDS; English prompts only:
    # a Chinese prompt is read through its prompt set's prompt_en, else not scored)
    rewards: list[Literal["pickscore", "hps", "imagereward"]] = Field(default_factory=list)
    pickscore: str = "yuvalkirstain/PickScore_v1"
    pickscore_processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # PickScore's tokenizer + image processor
    # HPSv2's hub repository and checkpoint (v2.1: HPS_v2.1_compressed.pt, v2.0: HPS_v2_compressed.pt), converted at
    # fetch time into <dir>/<hps>/<hps_version>/ (`kolora fetch models --scorers hps [--hps-version v2.0]`)
    hps: str = "xswu/HPSv2"
    hps_version: Literal["v2.1", "v2.0"] = "v2.1"
    imagereward: str = "THUDM/ImageReward"  # converted at fetch time into <dir>/<imagereward>/

    @field_validator("rewards", mode="before")
    @classmethod
    def _unique_rewards(cls, v: Any) -> Any:
        return list(dict.fromkeys(v)) if isinstance(v, list) else v

    @model_serializer(mode="wrap")
    def _omit_default_rewards(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)  # no reward scorer: the dumps and digests of configs from before these fields
        for field, default in REWARD_DEFAULTS.items():
            if getattr(self, field) == default:
                data.pop(field, None)
        return data


class EvaluateConfig(_Section):
    # CLIP and aesthetic scores of every tile, LoRA vs base model (kolora.evaluate.stage) -> eval/scores.json/csv
    enabled: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # The run's LoRA: the final step's (last), or the validation step whose samples score best under a scorer, or
    # under the mean of the scorers' ranks (kolora.evaluate.selection; needs train.validation.every); or under a
    # reward scorer (pickscore, hps, imagereward: English validation prompts or prompt_en glosses only)
    select: Literal["last", "clip", "aesthetic", "mean_rank", "pickscore", "hps", "imagereward"] = "last"

    @model_serializer(mode="wrap")
    def _omit_default_select(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)  # last: the run's LoRA as before the field existed (same dumps and digests)
        if self.select == "last":
            data.pop("select", None)
        return data


# Hugging Face / ModelScope license ids: apache-2.0, cc-by-nc-4.0, openrail++, other, ...
LICENSE_ID = re.compile(r"^[a-z0-9][a-z0-9.+-]*$")


class CardConfig(_Section):
    """The model card beside the LoRA (lora/README.md, kolora.report.card): what it says about its use."""

    license: str = "other"  # the card's `license:` (a Hugging Face license id)
    # The words that call up what the LoRA learned (the card's `instance_prompt:`); None: data.caption_prefix,
    # else data.caption (the caption every image had), else none
    trigger: str | None = Field(None, min_length=1)
    tags: list[str] = Field(default_factory=list)  # added to text-to-image, lora, kolors, diffusers

    @field_validator("license")
    @classmethod
    def _license_id(cls, v: str) -> str:
        if not LICENSE_ID.match(v):
            raise ValueError(f"{v!r} is not a license id: use a Hugging Face license id such as apache-2.0, "
                             "cc-by-nc-4.0, openrail++ or other (lowercase, no spaces)")
        return v

    @field_validator("tags")
    @classmethod
    def _one_line_tags(cls, v: list[str]) -> list[str]:
        bad = [t for t in v if not t.strip() or any(ch in t for ch in "\r\n")]
        if bad:
            raise ValueError(f"tag {bad[0]!r}: a tag is a non-empty word or phrase on one line, e.g. anime")
        return v


class ExperimentConfig(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    seed: Seed = 0
    # torch threads for the stages that run on a CPU (cache, train, render without a GPU). The result of a
    # CPU float reduction depends on the thread count, so it is part of the config: the same config gives the
    # same bits in one process, in a Slurm job or after a requeue. 1 also avoids OpenMP's collapse when the
    # threads share cores with other work (measured here: 40 tiny steps 3 s with 1 thread, 230 s with 2).
    cpu_threads: int = Field(1, ge=1)
    model: ModelConfig
    data: DataConfig = DataConfig()
    filter: FilterConfig = FilterConfig()
    cache: CacheConfig = CacheConfig()
    train: TrainConfig = TrainConfig()
    render: RenderConfig
    grid: GridConfig = GridConfig()
    scorers: ScorersConfig = ScorersConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    card: CardConfig = CardConfig()

    @model_serializer(mode="wrap")
    def _omit_default_evaluation(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Sections added later: at their defaults left out of dumps and digests, so earlier runs stay bound.
        data = handler(self)
        for section, default in (("scorers", ScorersConfig()), ("evaluate", EvaluateConfig())):
            if getattr(self, section) == default:
                data.pop(section, None)
        if self.card == CardConfig():
            data.pop("card", None)
        if self.render.base_tiles is None and isinstance(data.get("render"), dict):
            data["render"].pop("base_tiles", None)
        return data

    @model_validator(mode="after")
    def _selection_has_samples(self) -> ExperimentConfig:
        # a selection among validation steps needs them, and scorer models to score their samples with
        if self.evaluate.select != "last" and not self.train.validation.every:
            raise ValueError(f"evaluate.select: {self.evaluate.select} chooses among the validation steps, and "
                             "train.validation.every is 0 (none): set train.validation.every (e.g. 100), or "
                             "evaluate.select: last")
        if self.evaluate.select != "last" and self.scorers.dir is None:
            raise ValueError(f"evaluate.select: {self.evaluate.select} scores the validation samples with the "
                             "scorer models, and scorers.dir is not set: set it to the folder `kolora fetch models "
                             "--clip --aesthetics --to DIR` filled, or evaluate.select: last")
        return self

    def digest(self) -> str:
        """Hash of the resolved config (what a run directory is bound to)."""
        return config_digest(self.model_dump(mode="json"))


def config_digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def format_errors(err: ValidationError, source: str, origins: dict[tuple[str, ...], str] | None = None) -> str:
    problems = describe_validation_error(err, ExperimentConfig, override_origin(origins or {}))
    return format_problems(source, "config", problems)


def read_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    """A YAML file whose top level is a mapping; ConfigError naming the file otherwise."""
    try:
        raw = yaml.safe_load(read_text(path)) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except InputError as e:
        raise ConfigError(str(e)) from None
    if not isinstance(raw, dict):
        kind = "list" if isinstance(raw, list) else "text" if isinstance(raw, str) else "single value"
        raise ConfigError(f"{path}: the top level must be a mapping of {what}, found a {kind}")
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None, name: str | None = None) -> ExperimentConfig:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder; give a config file (e.g. configs/demo.yaml)")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (try configs/demo.yaml)")
    raw = read_yaml_mapping(path, "sections (model, data, filter, ...)")
    resolve_paths(raw, path.parent.resolve())
    origins = apply_overrides(raw, overrides or [], Path.cwd())
    if name is not None:
        raw["name"] = name
        origins[("name",)] = f"--name {name}"
    return validate_config(raw, str(path), origins)


def validate_config(raw: dict[str, Any], source: str = "config",
                    origins: dict[tuple[str, ...], str] | None = None) -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_errors(e, source, origins)) from None


def dump_config(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), allow_unicode=True, sort_keys=False)


def field_value(cfg: ExperimentConfig, dotted: str) -> Any:
    """A config field by its dotted name, as plain JSON-able data (how it enters a stage's key)."""
    node: Any = cfg
    many = False  # inside a list of sections (data.sources.repeats: every source's repeats)
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        node = [getattr(x, part) for x in node] if many else getattr(node, part)
        many = many or (isinstance(node, list) and i < len(parts) - 1)
    return [_plain(x) for x in node] if many else _plain(node)


def _plain(node: Any) -> Any:
    if hasattr(node, "model_dump"):
        return node.model_dump(mode="json")
    return [_plain(x) for x in node] if isinstance(node, list) else (str(node) if isinstance(node, Path) else node)
