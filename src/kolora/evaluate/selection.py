"""select: the run's LoRA chosen among the validation steps (evaluate.select), after training, on a CPU.

At `last` (the default) the run's LoRA is the final step's, as before: nothing is scored, and a LoRA an earlier
selection put in its place goes back (from lora/last/). Otherwise every validation sample of every step
(train/samples/step-XXXXXX/<i>-<seed>.png; step 0 holds the base model's) is scored with the configured scorers
(CLIP or Chinese-CLIP against its prompt, the aesthetic predictor: kolora.models.scorers, as the evaluate stage
scores tiles) → train/scores.csv (step, prompt, seed, scorer, value), and the step chosen:

- `clip` / `aesthetic`: the highest mean of that scorer over the validation prompts × seeds;
- `mean_rank`: per (prompt, seed), each scorer ranks the steps (1 = best, ties share their mean rank); the
  lowest mean of those ranks over scorers and (prompt, seed) wins;
- `pickscore` / `hps` / `imagereward`: the highest mean of that reward scorer (also scored, beside clip and
  aesthetic), over the validation prompts it can read (English, or the prompt set's prompt_en gloss).

Candidates are the validation steps after 0 whose LoRA training kept (train/samples/step-XXXXXX/
pytorch_lora_weights.safetensors); equal means go to the later step (nothing told them apart: stay nearest the
default, the final step). Each candidate's value has a 95 % bootstrap interval over the (prompt, seed) pairs
(kolora.core.stats); when the winner's overlaps the runner-up's, selection.json says it is not distinguishable.

Outputs: the chosen step's LoRA file, copied byte for byte, is the run's LoRA (lora/pytorch_lora_weights.safetensors,
what render and export read; its metadata names its step); lora/last/ holds the final step's; lora/selection.json
the step, the metric, its value and interval, the runner-up and the verdict.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

from kolora.cache.validation import prompt_texts
from kolora.core import hashing
from kolora.core.errors import RunFailure
from kolora.core.prompts import load_prompts
from kolora.core.rundir import RunDir, atomic_path, atomic_write_json, atomic_write_text
from kolora.core.stage import StageContext
from kolora.core.stats import Interval, distinguishable, mean_interval
from kolora.formats.lora import WEIGHT_NAME
from kolora.models import scorers
from kolora.models.kolors import quiet_libraries
from kolora.train.validation import (
    LAST_LORA_DIR,
    SCORES_COLUMNS,
    SCORES_FILE,
    SELECTION_FILE,
    sample_names,
    step_dir,
    step_lora,
)

# PIL, torch: imported in the functions that use them (a login node's CLI starts without them)

log = logging.getLogger("kolora.evaluate.selection")
SCORERS = ("clip", "aesthetic")  # evaluate's names for them
STEP_DIR_PREFIX = "step-"


# ---- scoring ----------------------------------------------------------------------------------------------
def sampled_steps(cfg, run: RunDir) -> list[int]:
    """The steps with validation samples, up to train.steps (a longer earlier training may have left later ones)."""
    steps = []
    for folder in (run.train / "samples").glob(f"{STEP_DIR_PREFIX}*"):
        digits = folder.name.removeprefix(STEP_DIR_PREFIX)
        if folder.is_dir() and digits.isdigit() and int(digits) <= cfg.train.steps:
            steps.append(int(digits))
    return sorted(steps)


def score_samples(cfg, run: RunDir, steps: list[int], progress=None) -> list[dict[str, Any]]:
    """Rows (step, prompt, seed, scorer, value) for every validation sample of `steps` that exists."""
    import torch
    from PIL import Image

    quiet_libraries()
    if not torch.cuda.is_available():
        torch.set_num_threads(cfg.cpu_threads)
    texts = prompt_texts(cfg)
    try:
        loaded = scorers.load_image_scorers(cfg.scorers, dict(enumerate(texts)), cfg.evaluate.device)
    except scorers.ScorerModelError as e:
        raise RunFailure(f"select: {e}") from None
    clip_names, clips, aesthetic = loaded.clip_of, loaded.clips, loaded.aesthetic
    reward, english = _reward_scorer(cfg)
    rows = []
    for n, step in enumerate(steps, 1):
        for i, seed, name in sample_names(cfg):
            path = step_dir(run.train, step) / name
            if not path.is_file():  # a sample that decoded to no picture (the training log says so)
                continue
            with Image.open(path) as im:
                image = im.convert("RGB")
            values = {"clip": scorers.clip_score(clips[clip_names[i]], [image], [texts[i]])[0],
                      "aesthetic": scorers.aesthetic_score(aesthetic, [image])[0]}
            if reward is not None and english[i] is not None:
                values[cfg.evaluate.select] = scorers.reward_score(cfg.evaluate.select, reward, [image], [english[i]])[0]
            rows += [{"step": step, "prompt": texts[i], "seed": seed, "scorer": k, "value": v} for k, v in values.items()]
        if progress:
            progress(n, len(steps))
    return rows


def _reward_scorer(cfg) -> tuple[Any, list[str | None]]:
    """The reward scorer evaluate.select names (None for the others) and the English text it reads for each
    validation prompt; RunFailure when it is missing or can read none."""
    if cfg.evaluate.select not in scorers.REWARDS:
        return None, []
    v = cfg.train.validation
    english = scorers.english_validation_texts(list(v.prompts), validation_items(cfg), v.count)
    if not any(english):
        raise RunFailure(f"select: {cfg.evaluate.select} {scorers.NO_ENGLISH_VALIDATION}")
    try:
        return scorers.load_reward(cfg.scorers, cfg.evaluate.select, cfg.evaluate.device)[0], english
    except scorers.ScorerModelError as e:
        raise RunFailure(f"select: {e}") from None


def validation_items(cfg) -> list:
    """The prompt set's items (their prompt_en glosses) when the validation prompts come from it."""
    return [] if cfg.train.validation.prompts else load_prompts(cfg.render.prompts, cfg.render.negative_prompt)


def scores_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(SCORES_COLUMNS)
    for r in rows:
        writer.writerow([r["step"], r["prompt"], r["seed"], r["scorer"], repr(float(r["value"]))])
    return buf.getvalue()


# ---- choosing ---------------------------------------------------------------------------------------------
def _by_step(rows: list[dict[str, Any]], scorer: str) -> dict[int, dict[tuple[str, int], float]]:
    out: dict[int, dict[tuple[str, int], float]] = defaultdict(dict)
    for r in rows:
        if r["scorer"] == scorer:
            out[int(r["step"])][(r["prompt"], int(r["seed"]))] = float(r["value"])
    return out


def _ranks(values: dict[int, float]) -> dict[int, float]:
    """1 for the highest value; tied values share the mean of their ranks."""
    ordered = sorted(values.values(), reverse=True)
    return {step: sum(k + 1 for k, x in enumerate(ordered) if x == v) / ordered.count(v) for step, v in values.items()}


def per_pair_values(rows: list[dict[str, Any]], metric: str, steps: list[int]) -> dict[int, list[float]]:
    """Each step's values over the (prompt, seed) pairs under `metric`: a scorer's scores, or (mean_rank) the mean
    over scorers of the step's rank among `steps` for that pair (pairs that every step has)."""
    if metric != "mean_rank":
        by_step = _by_step(rows, metric)
        return {step: list(by_step[step].values()) for step in steps if by_step.get(step)}
    tables = {scorer: _by_step(rows, scorer) for scorer in SCORERS}
    pairs = set.intersection(*(set(t.get(step, {})) for t in tables.values() for step in steps))
    out: dict[int, list[float]] = {step: [] for step in steps}
    for pair in sorted(pairs):
        ranks = [_ranks({step: t[step][pair] for step in steps}) for t in tables.values()]
        for step in steps:
            out[step].append(sum(r[step] for r in ranks) / len(ranks))
    return {step: v for step, v in out.items() if v}


def choose(rows: list[dict[str, Any]], metric: str, candidates: list[int]) -> dict[str, Any]:
    """The best of `candidates` under `metric` (clip, aesthetic: higher is better; mean_rank: lower), with the
    runner-up and whether their 95 % intervals tell them apart; equal means go to the later step."""
    higher = metric != "mean_rank"
    values = per_pair_values(rows, metric, candidates)
    if not values:
        raise RunFailure(f"select: no scores of {metric} for any of the steps {candidates}")
    intervals = {step: mean_interval(v) for step, v in values.items()}
    order = sorted(intervals, key=lambda step: (-intervals[step].mean if higher else intervals[step].mean, -step))
    best = order[0]
    out: dict[str, Any] = {"metric": metric, "higher_is_better": higher, "step": best,
                           "value": intervals[best].mean, "interval": intervals[best].as_dict(),
                           "runner_up": None, "distinguishable": None,
                           "steps": {str(step): intervals[step].as_dict() for step in sorted(intervals)}}
    if len(order) == 1:
        out["verdict"] = f"step {best} is the only candidate"
        return out
    second = order[1]
    apart = distinguishable(intervals[best], intervals[second])
    out.update(runner_up={"step": second, "value": intervals[second].mean, "interval": intervals[second].as_dict()},
               distinguishable=apart)
    out["verdict"] = (f"step {best} is distinguishable from step {second}: their 95 % intervals do not overlap"
                      if apart else
                      f"step {best} is not distinguishable from step {second}: their 95 % intervals overlap "
                      f"({_fmt(intervals[best])} vs {_fmt(intervals[second])})")
    return out


def _fmt(interval: Interval) -> str:
    return f"{interval.mean:.4g} [{interval.low:.4g}, {interval.high:.4g}]"


# ---- the run's LoRA -----------------------------------------------------------------------------------------
def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def install(run: RunDir, source: Path) -> None:
    """`source` becomes the run's LoRA; the final step's goes to lora/last/ first (training removes lora/last/
    when it writes a new final LoRA, so without it the run's LoRA is the final step's)."""
    lora, last = run.lora / WEIGHT_NAME, run.root / LAST_LORA_DIR / WEIGHT_NAME
    if not last.is_file():
        _copy(lora, last)
    _copy(source, lora)


def restore_last(run: RunDir) -> bool:
    """The final step's LoRA back as the run's (a selection made earlier had replaced it); whether it was."""
    last = run.root / LAST_LORA_DIR / WEIGHT_NAME
    if not last.is_file():
        return False
    os.replace(last, run.lora / WEIGHT_NAME)
    shutil.rmtree(last.parent, ignore_errors=True)
    return True


def run(ctx: StageContext) -> dict[str, Any]:
    cfg, run = ctx.cfg, ctx.run
    metric, final = cfg.evaluate.select, cfg.train.steps
    lora = run.lora / WEIGHT_NAME
    if not lora.is_file():
        raise RunFailure(f"select: {lora} is missing: run the train stage first")
    if metric == "last":
        restored = restore_last(run)
        atomic_write_json(run.root / SELECTION_FILE, {"metric": "last", "step": final,
                                                      "lora": str(lora.relative_to(run.root))})
        return {"metric": "last", "step": final, "restored_last": restored}

    steps = sampled_steps(cfg, run)
    candidates = [s for s in steps if s > 0 and step_lora(run.train, s).is_file()]
    if not candidates:
        raise RunFailure(
            f"select: evaluate.select: {metric} chooses among the validation steps' LoRAs, and "
            f"{run.train / 'samples'} holds none (training keeps them, beside each step's samples, only when "
            "evaluate.select is set as it trains): train again with it set (kolora run CONFIG --stage train "
            "--force, which discards this training), or set evaluate.select: last")
    if without := [s for s in steps if s > 0 and s not in candidates]:
        log.warning("select: steps %s have samples but no LoRA (trained before evaluate.select was set): scored, "
                    "not candidates", without)
    rows = score_samples(cfg, run, steps, ctx.progress)
    chosen = choose(rows, metric, candidates)
    if 0 in steps and metric != "mean_rank":
        base = per_pair_values(rows, metric, [0]).get(0)
        chosen["base"] = mean_interval(base).as_dict() if base else None
    atomic_write_text(run.root / SCORES_FILE, scores_csv(rows))
    source = step_lora(run.train, chosen["step"])
    install(run, source)
    chosen.update(final_step=final, lora=str(lora.relative_to(run.root)),
                  source=str(source.relative_to(run.root)), last=str(LAST_LORA_DIR / WEIGHT_NAME),
                  lora_sha256=hashing.file_sha256(lora), without_lora=without)
    atomic_write_json(run.root / SELECTION_FILE, chosen)
    log.info("select: %s", chosen["verdict"])
    return {"metric": metric, "step": chosen["step"], "value": round(chosen["value"], 4),
            "runner_up": (chosen["runner_up"] or {}).get("step"), "distinguishable": chosen["distinguishable"],
            "scored_steps": steps}
