"""The evaluate and select stages as the registry sees them (kolora.core.stage.Stage); kolora.evaluate.stage and
kolora.evaluate.selection do the work."""

from kolora.cache.validation import prompt_texts
from kolora.core import hashing
from kolora.core.prompts import load_prompts
from kolora.core.stage import Stage
from kolora.train.validation import SCORES_FILE, SELECTION_FILE


def _done(cfg, run, complete) -> bool:
    return not cfg.evaluate.enabled or (run.root / "eval" / "scores.json").is_file()


def _selection_done(cfg, run, complete) -> bool:
    return (run.root / SELECTION_FILE).is_file() and (
        cfg.evaluate.select == "last" or (run.root / SCORES_FILE).is_file())


def _validation_key(cfg, run) -> dict:
    """What a selection scores (nothing at `last`: keys as before): the validation prompts, and the samples and
    LoRAs of every validation step, by content."""
    if cfg.evaluate.select == "last":
        return {}
    files = {f"{folder.name}/{p.name}": hashing.sampled(p)
             for folder in sorted((run.train / "samples").glob("step-*")) if folder.is_dir()
             for p in sorted(folder.iterdir()) if p.suffix in (".png", ".safetensors")}
    if cfg.evaluate.select in ("clip", "aesthetic", "mean_rank"):
        return {"validation": {"prompts": prompt_texts(cfg), "files": files}}
    # a reward scorer: also the English glosses it reads
    glosses = [] if cfg.train.validation.prompts else [
        p.prompt_en for p in load_prompts(cfg.render.prompts, cfg.render.negative_prompt)]
    return {"validation": {"prompts": prompt_texts(cfg), "files": files, "prompt_en": glosses}}


def _gloss_key(cfg, run) -> dict:
    """The prompt set's English glosses, which the reward scorers read (nothing without scorers.rewards: keys as
    before)."""
    if not cfg.scorers.rewards:
        return {}
    return {"prompt_en": [p.prompt_en for p in load_prompts(cfg.render.prompts, cfg.render.negative_prompt)]}


STAGE = Stage(
    "evaluate", entry="kolora.evaluate.stage:run", runs_on="cpu", parallel="none", after=("render",),
    inputs=("evaluate.enabled", "scorers.clip", "scorers.chinese_clip", "scorers.aesthetic", "scorers.language",
            "scorers.rewards", "scorers.pickscore", "scorers.pickscore_processor", "scorers.hps",
            "scorers.hps_version", "scorers.imagereward"),
    content=("scorers.dir",), outputs=("eval",), done=_done, stoppable=False, extra_key=_gloss_key,
    extra_key_note="the prompt set's prompt_en glosses (when scorers.rewards is set)")

# In the train job after training (its rank 0), before render reads the LoRA it leaves in place.
SELECT = Stage(
    "select", entry="kolora.evaluate.selection:run", runs_on="cpu", parallel="none", after=("train",),
    inputs=("evaluate.select", "scorers.clip", "scorers.chinese_clip", "scorers.aesthetic", "scorers.language",
            "scorers.pickscore", "scorers.pickscore_processor", "scorers.hps", "scorers.hps_version",
            "scorers.imagereward"),
    content=("scorers.dir",), outputs=(str(SELECTION_FILE), str(SCORES_FILE)), done=_selection_done,
    stoppable=False, extra_key=_validation_key,
    extra_key_note="the validation samples, their LoRAs and prompts (when evaluate.select is not last; with a reward "
                   "scorer, the prompt set's prompt_en glosses too)")
