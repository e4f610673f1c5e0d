"""The model card: README.md beside the LoRA, ready to upload to Hugging Face or ModelScope as it is.

Its front matter (YAML, both hubs read it): base_model, library_name, tags, license and instance_prompt (the
trigger words) from the config's `card:` section, the samples as Hugging Face `widget:` entries. Then the grid and
a few samples (JPEG copies in images/ beside it, linked relatively), the selected step and its scores, the
training settings, the dataset (source, counts kept and dropped by each filter op) and how to load the file:
diffusers, and ComfyUI through the kohya export (the run's diffusers-format file does not load there).

The report stage writes it into lora/; `kolora export` writes one beside the exported file, about that file.
Nothing here uploads: uploading is a login-node command the card shows. The card holds no time or absolute
path, so writing it again from the same run gives the same bytes. Every string from a dataset or a config is
shown in a code span or block (`inline_code`, `code_block`) or a YAML value, never as markdown."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kolora.core.config import DatasetFields, ExperimentConfig
from kolora.core.errors import RunFailure
from kolora.core.prompts import PromptItem, load_prompts
from kolora.core.rundir import RunDir, atomic_path, atomic_write_text
from kolora.core.stats import LEVEL, Interval
from kolora.filter import report_page as filter_page
from kolora.formats.lora import ADAPTER_NAMES, WEIGHT_NAME
from kolora.render.tiles import tiles
from kolora.train import metrics as train_metrics
from kolora.train.validation import SELECTION_FILE

# PIL: imported in the functions that use them (a login node's CLI starts without them)

CARD = "README.md"
IMAGES = "images"
GRID_IMAGE = "grid.jpg"
SAMPLES = 4  # sample tiles shown (the first seed of each prompt first)
MAX_SIDE = {"grid": 2048, "sample": 1024}  # larger images are scaled down: the card stays a few MB
BASE_MODEL = "Kwai-Kolors/Kolors-diffusers"
TAGS = ("text-to-image", "lora", "kolors", "diffusers")
MARK = "<!-- kolora model card: kolora writes this file again from the run (kolora.report.card) -->"
_SAMPLE = re.compile(r"^sample-(\d+)-(-?\d+)\.jpg$")
SCORE_NAMES = {"clip": "CLIP score (image-text)", "aesthetic": "aesthetic score",
               "pickscore": "PickScore (human preference, English prompts)",
               "hps": "HPSv2 (human preference, English prompts)",
               "imagereward": "ImageReward (human preference, English prompts)"}
SIDES = ("lora", "base", "lora_minus_base")  # eval/scores.json's intervals: {side: {metric: interval}}


@dataclass(frozen=True)
class Weights:
    """The LoRA file the card sits beside: its name and format (diffusers: kolora's own file)."""

    name: str = WEIGHT_NAME
    format: str = "diffusers"  # diffusers | peft | kohya | diffsynth


def applies(cfg: ExperimentConfig, run: RunDir) -> bool:
    """A card describes the run's own LoRA: not when render.lora rendered another one, nor before training."""
    return cfg.render.lora is None and (run.lora / WEIGHT_NAME).is_file()


# ---- markdown that shows user strings as text ---------------------------------------------------------------
def inline_code(text: Any) -> str:
    """`text` as a code span: one line, delimited by more backticks than it holds."""
    s = " ".join(str(text).split())
    fence = "`" * (max((len(m) for m in re.findall(r"`+", s)), default=0) + 1)
    pad = " " if s.startswith("`") or s.endswith("`") else ""
    return f"{fence}{pad}{s}{pad}{fence}"


def code_block(text: Any, lang: str = "text") -> str:
    """`text` as a fenced block, its fence longer than any backtick run inside."""
    s = str(text)
    fence = "`" * max(3, max((len(m) for m in re.findall(r"`+", s)), default=0) + 1)
    return f"{fence}{lang}\n{s}\n{fence}"


def _cell(value: Any) -> str:
    """A table cell: a number as it is, anything else in a code span (a `|` inside escaped for the table)."""
    if isinstance(value, bool) or value is None:
        return "yes" if value is True else "no" if value is False else "–"
    if isinstance(value, int | float):
        return f"{value:g}" if isinstance(value, float) else str(value)
    return inline_code(value).replace("|", "\\|")


def _py(text: str) -> str:
    """A Python string literal of `text` (JSON's escapes are Python's)."""
    return json.dumps(text, ensure_ascii=False)


def _table(head: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                      *("| " + " | ".join(r) + " |" for r in rows)])


# ---- what the card reads from the run ------------------------------------------------------------------------
def read_selection(run: RunDir) -> dict[str, Any] | None:
    """lora/selection.json (the checkpoint selection), when there is one."""
    path = run.root / SELECTION_FILE
    if not path.is_file():
        return None
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RunFailure(f"model card: {path} is not readable JSON ({e}); run the selection again") from None
    return found if isinstance(found, dict) else None


def trigger(cfg: ExperimentConfig) -> str | None:
    return cfg.card.trigger or cfg.data.caption_prefix or cfg.data.caption


@dataclass(frozen=True)
class Sample:
    """A sample the card shows: its render prompt (by its index in render.prompts) and the image to show."""

    index: int
    item: PromptItem
    image: Path

    @property
    def name(self) -> str:
        return f"sample-{self.index:03d}-{self.item.seed}.jpg"


def rendered_samples(cfg: ExperimentConfig, run: RunDir) -> list[Sample]:
    """Up to SAMPLES rendered tiles: each prompt's first one, then the others."""
    rendered = [Sample(t.index, t.item, t.path(run)) for t in tiles(cfg, run)
                if t.path(run) is not None and t.path(run).is_file()]
    firsts, others, seen = [], [], set()
    for s in rendered:
        (others if s.item.prompt in seen else firsts).append(s)
        seen.add(s.item.prompt)
    return (firsts + others)[:SAMPLES]


def card_samples(cfg: ExperimentConfig, run: RunDir) -> list[Sample]:
    """The samples of the run's own card (lora/images/), by their prompt index and seed: what an export's card
    shows (the tiles' keys need the model, which a login node may not hold)."""
    items = load_prompts(cfg.render.prompts, cfg.render.negative_prompt)
    found = []
    for image in sorted((run.lora / IMAGES).glob("sample-*.jpg")):
        m = _SAMPLE.match(image.name)
        if m and int(m.group(1)) < len(items) and items[int(m.group(1))].seed == int(m.group(2)):
            found.append(Sample(int(m.group(1)), items[int(m.group(1))], image))
    return found


# ---- sections ------------------------------------------------------------------------------------------------
def front_matter(cfg: ExperimentConfig, shown: list[Sample]) -> str:
    meta: dict[str, Any] = {
        "base_model": BASE_MODEL, "base_model_relation": "adapter", "library_name": "diffusers",
        "pipeline_tag": "text-to-image", "license": cfg.card.license,
        "tags": list(dict.fromkeys([*TAGS, *cfg.card.tags])),
        # ModelScope's fields
        "frameworks": ["Pytorch"], "tasks": ["text-to-image-synthesis"]}
    if trigger(cfg):
        meta["instance_prompt"] = trigger(cfg)
    if shown:
        meta["widget"] = [{"text": s.item.prompt, "output": {"url": f"{IMAGES}/{s.name}"}} for s in shown]
    return "---\n" + yaml.safe_dump(meta, allow_unicode=True, sort_keys=False) + "---\n"


def _value(v: Any, interval: Any = None) -> str:
    """A score: a number, or {"mean", "low", "high", "n"} (kolora.core.stats.Interval.as_dict) as mean [low, high];
    `interval`: its interval given beside it (eval/scores.json's intervals.<side>.<metric>), or the interval alone."""
    iv = v if isinstance(v, dict) else interval if isinstance(interval, dict) else None
    mean = v.get("mean") if isinstance(v, dict) else v if v is not None else (iv or {}).get("mean")
    if not isinstance(mean, int | float):
        return "–"
    if iv is not None and all(isinstance(iv.get(k), int | float) for k in ("low", "high")):
        return str(Interval(float(mean), float(iv["low"]), float(iv["high"]), int(iv.get("n") or 0)))
    return f"{mean:.4f}"


def scores_section(scores: dict[str, Any] | None) -> list[str]:
    if not scores or not isinstance(scores.get("summary"), dict) or not scores["summary"]:
        return ["No scores: the evaluate stage did not run (`evaluate.enabled: true` scores every tile, LoRA vs "
                "base model)."]
    summary, intervals = scores["summary"], scores.get("intervals") or {}
    n = len(scores.get("tiles") or [])
    rows, has_iv = [], False
    with_diff = isinstance(intervals.get("lora_minus_base"), dict) and bool(intervals["lora_minus_base"])
    for metric, by in summary.items():
        if not isinstance(by, dict):
            continue
        ivs = {side: (intervals.get(side) or {}).get(metric) for side in SIDES if isinstance(intervals.get(side), dict)}
        has_iv |= any(isinstance(x, dict) for x in (*by.values(), *ivs.values()))
        model = (scores.get("models") or {}).get(metric)  # {"name", "fingerprint"} (older files: the name)
        model = model.get("name") if isinstance(model, dict) else model if isinstance(model, str) else None
        label = SCORE_NAMES.get(metric, inline_code(metric)) + (f", {inline_code(model)}" if model else "")
        rows.append([label.replace("|", "\\|"),
                     *(_value(by.get(side), ivs.get(side)) for side in SIDES)])
    head = ["score", "LoRA", "base model"] + (["LoRA − base"] if with_diff else [])
    out = [f"Mean over {n} tiles (the render prompts and seeds), the LoRA and the base model with the same prompt "
           "and seed" + (f" ({LEVEL:.0%} bootstrap intervals in brackets)" if has_iv else "") + ":", "",
           _table(head, [r[:len(head)] for r in rows])]
    return out


def selection_section(cfg: ExperimentConfig, run: RunDir, selection: dict[str, Any] | None) -> list[str]:
    """The step the LoRA is (lora/selection.json, kolora.evaluate.selection), else the final one."""
    if selection is None or not isinstance(selection.get("step"), int) or selection.get("metric") in (None, "last"):
        loss = train_metrics.rows(run.root, upto=cfg.train.steps)
        final = int(loss[-1]["step"]) if loss else cfg.train.steps
        return [f"This is the final step ({final}) of the training."]
    metric = str(selection["metric"])
    value = _value(selection.get("value"), selection.get("interval"))
    interval = selection.get("interval") if isinstance(selection.get("interval"), dict) else selection.get("value")
    n = interval.get("n") if isinstance(interval, dict) else None
    what = "the lowest mean rank over the scorers" if metric == "mean_rank" else f"the highest mean {inline_code(metric)}"
    out = [f"This is step **{selection['step']}** of {selection.get('final_step', cfg.train.steps)}, selected for "
           f"{what} on the validation samples: {value}" + (f" over {n} prompt and seed pairs" if n else "") + "."]
    runner = selection.get("runner_up")
    if isinstance(runner, dict) and runner.get("step") is not None:
        out.append(f"The runner-up, step {_cell(runner['step'])}, scored "
                   f"{_value(runner.get('value'), runner.get('interval'))}"
                   + ("; the selection tells the two apart." if selection.get("distinguishable") is True else
                      "; the selection cannot tell the two apart on these samples (either is as good)."
                      if selection.get("distinguishable") is False else "."))
    if isinstance(selection.get("base"), dict):
        out.append(f"The base model scored {_value(selection['base'])} on the same samples.")
    if (run.lora / "last").is_dir():
        out.append("The final step's LoRA is in `last/` beside this file.")
    return [" ".join(out)]


def training_section(cfg: ExperimentConfig, run: RunDir) -> list[str]:
    t = cfg.train
    loss = train_metrics.rows(run.root, upto=t.steps)
    adapter = ADAPTER_NAMES.get(t.adapter, t.adapter) + (" (DoRA)" if t.dora else "")
    rows = [["adapter", f"{adapter} on the UNet's {', '.join(inline_code(m) for m in t.target_modules)}"],
            ["rank / alpha", f"{t.rank} / {t.alpha:g}"], ["steps", str(t.steps)],
            ["batch size", str(t.batch_size)], ["learning rate", f"{t.lr:g}"], ["optimizer", _cell(t.optimizer)],
            ["lr schedule", _cell(t.lr_scheduler) + (f", {t.warmup_steps} warmup steps" if t.warmup_steps else "")],
            ["resolution", f"{t.resolution}" + (" (aspect-ratio buckets)" if t.buckets else " (square crop)")],
            ["precision", _cell(t.precision)], ["seed", str(t.seed)]]
    options = {"min-SNR γ": t.min_snr_gamma, "noise offset": t.noise_offset or None,
               "caption dropout": t.caption_dropout or None, "EMA decay": t.ema_decay,
               "block ranks": t.block_ranks or None, "block alphas": t.block_alphas or None,
               "LoKr factor": t.lokr_factor if t.adapter == "lokr" else None}
    rows += [[k, _cell(json.dumps(v, sort_keys=True) if isinstance(v, dict) else v)]
             for k, v in options.items() if v is not None]
    if t.timesteps != "per_batch":
        rows.append(["timesteps", _cell(t.timesteps)])
    if loss:
        rows.append(["final loss", f"{loss[-1]['loss']:.4f} (step {int(loss[-1]['step'])})"])
    return [f"Trained with kolora on the UNet of {BASE_MODEL} (the text encoder and VAE unchanged):",
            "", _table(["setting", "value"], rows)]


def _describe(d: DatasetFields) -> str:
    """A dataset in a few words: its id, or its folder's or file's name (no path of the cluster in a card)."""
    if d.source == "synthetic":
        return f"synthetic shapes (kolora's demo data, {d.synthetic.count} images)"
    if d.source == "modelscope" and d.dataset_id:
        return f"ModelScope dataset {inline_code(d.dataset_id)} (subset {inline_code(d.subset)}, split {inline_code(d.split)})"
    return f"a {d.source} dataset, {inline_code(Path(str(d.path)).name)}"


def _sources(cfg: ExperimentConfig) -> list[str]:
    d = cfg.data
    if not d.sources:
        return [f"Source: {_describe(d)}."]
    return ["Sources:", "", *(f"- {inline_code(s.name)}: {_describe(s)}"
                              + (f", {s.repeats} repeats per epoch" if s.repeats != 1 else "")
                              + (f", captions prefixed {inline_code(s.caption_prefix)}" if s.caption_prefix else "")
                              for s in d.sources)]


def dataset_section(cfg: ExperimentConfig, report: dict[str, Any] | None) -> list[str]:
    d = cfg.data
    captions = {"keep": "the dataset's own captions", "generate": "captions generated where the dataset had none",
                "replace": "captions generated for every image"}[d.captions]
    if d.caption is not None:
        captions = f"every image captioned {inline_code(d.caption)}"
    out = [*_sources(cfg), "", f"Captions: {captions}" + (
        f", with {inline_code(d.caption_prefix)} before each" if d.caption_prefix else "") + "."]
    if report is None:
        return [*out, "", "No filter report (filter/report.json) was found."]
    rows = report.get("samples") or []
    summary = report.get("summary") or {}
    dropped = Counter(filter_page.group_of(r) for r in rows if not r.get("kept"))
    ops = [str(op) for op in summary.get("ops", [])]
    checks = set(filter_page.CHECKS.values())
    left, table_rows = len(rows), []
    for step in filter_page.steps(report):
        if dropped[step] or step in ops:
            label = step if step in checks else _cell(step)  # an op's name from the config
            table_rows.append([label, str(left), str(dropped[step]), str(left - dropped[step])])
            left -= dropped[step]
    kept = summary.get("kept", left)
    out += ["", f"**{kept} of {summary.get('input', len(rows))} images kept** for training after the filter "
            "(Data-Juicer ops, in order):", "",
            _table(["step", "in", "dropped", "kept"], table_rows)]
    per_source = [r for r in rows if r.get("source") is not None and r.get("stage") != "ingest"]
    names = list(dict.fromkeys(str(r["source"]) for r in per_source))
    if len(names) > 1 or d.sources:
        cols = [g for g in filter_page.steps(report) if dropped[g] and g != filter_page.CHECKS["ingest"]]
        seen = Counter(str(r["source"]) for r in per_source)
        kept_by = Counter(str(r["source"]) for r in per_source if r.get("kept"))
        lost = Counter((str(r["source"]), filter_page.group_of(r)) for r in per_source if not r.get("kept"))
        head = ["source", "images", "kept", *(f"dropped by {g if g in checks else _cell(g)}" for g in cols)]
        out += ["", _table(head, [[_cell(n), str(seen[n]), str(kept_by[n]), *(str(lost[n, g]) for g in cols)]
                                  for n in names])]
    return out


def samples_section(shown: list[Sample], cfg: ExperimentConfig) -> list[str]:
    r = cfg.render
    out = []
    for n, s in enumerate(shown, 1):
        out += [f"![sample {n}]({IMAGES}/{s.name})", "",
                f"Seed {s.item.seed}, {r.steps} steps, guidance {r.cfg:g}, {r.width}×{r.height}, LoRA scale "
                f"{r.lora_scale:g}. Prompt (negative prompt {inline_code(s.item.negative_prompt or '')}):", "",
                code_block(s.item.prompt), ""]
    return out


def loading_section(cfg: ExperimentConfig, weights: Weights, run_name: str) -> list[str]:
    t, r = cfg.train, cfg.render
    kohya = f"kolora export {run_name} --format kohya"
    prompt = trigger(cfg) or "your prompt"
    diffusers = code_block(
        "import torch\nfrom diffusers import KolorsPipeline\n\n"
        f"pipe = KolorsPipeline.from_pretrained({_py(BASE_MODEL)}, variant=\"fp16\", torch_dtype=torch.float16)"
        ".to(\"cuda\")\n"
        "# the hub id of this card's repository, or the folder holding it\n"
        f"pipe.load_lora_weights(\"USER/NAME\", weight_name={_py(weights.name)})\n"
        f"image = pipe({_py(prompt)}, negative_prompt={_py(r.negative_prompt)}, guidance_scale={r.cfg:g},\n"
        f"             num_inference_steps={r.steps}).images[0]", "python")
    comfy = ("Kolors in ComfyUI takes custom nodes for its ChatGLM3 text encoder: install e.g. "
             "[ComfyUI-Kolors-MZ](https://github.com/MinusZoneAI/ComfyUI-Kolors-MZ) (Kolors' UNet in "
             "`models/unet/`, ChatGLM3 in `models/LLM/`; nodes `MZ_KolorsUNETLoaderV2`, `MZ_ChatGLM3Loader`, "
             "`MZ_ChatGLM3_V2`), put the kohya file in `models/loras/` and apply it to the UNet's MODEL with a "
             "`LoraLoaderModelOnly` node before the KSampler.")
    out = []
    if weights.format in ("diffusers", "peft") and t.adapter == "lora":
        out += ["### diffusers", "",
                f"`{weights.name}` is diffusers' LoRA format (rank {t.rank} and alpha {t.alpha:g} in its metadata):",
                "", diffusers, ""]
    elif weights.format == "kohya" and t.adapter == "lora":
        out += ["### diffusers", "", f"`load_lora_weights` converts the kohya file `{weights.name}` as it loads it:",
                "", diffusers, ""]
    elif weights.format == "peft":
        out += ["### peft", "", f"A {ADAPTER_NAMES[t.adapter]} as a peft adapter folder (diffusers' `load_lora_weights` "
                "cannot read it): `PeftModel.from_pretrained(pipe.unet, FOLDER)` with this folder.", ""]
    elif weights.format == "diffusers":
        out += ["### diffusers / peft", "",
                f"A {ADAPTER_NAMES[t.adapter]}: diffusers' `load_lora_weights` cannot read it. "
                f"`kolora export {run_name} --format peft` writes a peft adapter folder "
                "(`PeftModel.from_pretrained(pipe.unet, FOLDER)`).", ""]
    if weights.format == "kohya":
        out += ["### ComfyUI", "", f"`{weights.name}` is the kohya format ComfyUI and WebUIs read. {comfy}", ""]
    elif weights.format == "diffsynth":
        out += ["### DiffSynth-Studio", "", f"`{weights.name}` holds DiffSynth's raw LoRA tensors (no alpha inside):",
                "", code_block(f"# rank {t.rank}, alpha {t.alpha:g}\nload_lora(pipe.unet, lora_rank={t.rank}, "
                               f"lora_alpha={t.alpha:g}, lora_path={_py(weights.name)})", "python"), ""]
    elif t.dora:
        out += ["### ComfyUI", "", "A DoRA LoRA: its magnitude vectors have no place in the kohya format, so it does "
                "not export for ComfyUI.", ""]
    else:
        out += ["### ComfyUI", "",
                f"This diffusers-format file does not load in ComfyUI. `{kohya}` writes the kohya file (and this card) "
                f"to `lora/kohya/`. {comfy}", ""]
    return out


def upload_section(folder: str) -> list[str]:
    return ["From a login node (kolora uploads nothing; compute nodes are offline), this folder as it is:", "",
            code_block(f"hf upload USER/NAME {folder} .          # or: huggingface-cli upload USER/NAME {folder} .\n"
                       f"modelscope upload USER/NAME {folder}", "bash")]


def _shown_folder(run: RunDir, folder: Path) -> str:
    """The card's folder as the card names it: runs/<run>/... inside the run, else FOLDER (no absolute path)."""
    folder, root = Path(folder).resolve(), run.root.resolve()
    if folder.is_relative_to(root):
        return f"runs/{root.name}/{folder.relative_to(root).as_posix()}"
    return "FOLDER"


def build(cfg: ExperimentConfig, run: RunDir, folder: Path, weights: Weights, shown: list[Sample], grid: bool,
          scores: dict[str, Any] | None, filter_report: dict[str, Any] | None,
          selection: dict[str, Any] | None) -> str:
    """The card's text, for `folder`."""
    tr = trigger(cfg)
    intro = (f"A {ADAPTER_NAMES.get(cfg.train.adapter, 'LoRA')} for [Kolors]"
             f"(https://huggingface.co/{BASE_MODEL}), trained with kolora (run {inline_code(cfg.name)}).")
    parts = [front_matter(cfg, shown), MARK, "", f"# {cfg.name}", "", intro, ""]
    if tr:
        parts += [f"Trigger words: {inline_code(tr)} (put them in the prompt).", ""]
    if grid:
        parts += [f"![the storyboard: every render prompt and seed]({IMAGES}/{GRID_IMAGE})", ""]
    parts += ["## Selected step and scores", "", *selection_section(cfg, run, selection), "",
              *scores_section(scores), ""]
    if shown:
        parts += ["## Samples", "", *samples_section(shown, cfg)]
    parts += ["## How to use it", "", *loading_section(cfg, weights, run.root.name),
              "## Training settings", "", *training_section(cfg, run), "",
              "## Dataset", "", *dataset_section(cfg, filter_report), "",
              "## Uploading", "", *upload_section(_shown_folder(run, folder)), ""]
    return "\n".join(parts)


def _save_jpeg(src: Path, dest: Path, max_side: int) -> None:
    from PIL import Image

    if src.suffix == ".jpg":  # the run's card's own image, already scaled
        with atomic_path(dest) as tmp:
            shutil.copyfile(src, tmp)
        return
    with Image.open(src) as im:
        im = im.convert("RGB")
        if max(im.size) > max_side:
            scale = max_side / max(im.size)
            im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.LANCZOS)
        with atomic_path(dest) as tmp:
            im.save(tmp, "JPEG", quality=90)


def card_path(folder: Path) -> Path:
    """README.md, unless a README.md kolora did not write is there (an export into a shared folder)."""
    path = Path(folder) / CARD
    if path.is_file() and MARK not in path.read_text(errors="replace"):
        return path.with_name("kolora-card.md")
    return path


def write(cfg: ExperimentConfig, run: RunDir, folder: Path, scores: dict[str, Any] | None,
          weights: Weights | None = None, from_card: bool = False) -> Path:
    """The card and its images in `folder` (images first, the card last), with eval/scores.json's `scores`: its
    path. from_card: the images of the run's own card (lora/), not the render tiles and grid.png (an export)."""
    weights = weights or Weights()
    folder = Path(folder)
    images = folder / IMAGES
    shown = card_samples(cfg, run) if from_card else rendered_samples(cfg, run)
    for s in shown:
        _save_jpeg(s.image, images / s.name, MAX_SIDE["sample"])
    grid_file = run.lora / IMAGES / GRID_IMAGE if from_card else run.grid_file
    grid = grid_file.is_file()
    if grid:
        _save_jpeg(grid_file, images / GRID_IMAGE, MAX_SIDE["grid"])
    wanted = {s.name for s in shown}
    for stale in images.glob("sample-*.jpg") if images.is_dir() else []:
        if _SAMPLE.match(stale.name) and stale.name not in wanted:
            stale.unlink()
    text = build(cfg, run, folder, weights, shown, grid, scores, filter_page.read_report(run),
                 read_selection(run))
    path = card_path(folder)
    atomic_write_text(path, text)
    return path
