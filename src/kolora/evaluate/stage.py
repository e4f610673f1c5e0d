"""evaluate: every rendered tile scored against its prompt, LoRA vs base model -> eval/scores.json, scores.csv.

For each (prompt, seed) of the prompt set: the CLIP image-text score of the LoRA tile (render/) and of the
base model's tile (render/base/, the same prompt and seed without the LoRA), with Chinese-CLIP for Chinese
prompts (scorers.language), and the aesthetic predictor's score of both. Models come from scorers.dir only
(kolora.models.scorers; nothing is downloaded). The whole folder eval/ is written at once (atomic), so a stopped job
leaves the previous scores or none.

scores.json: {"models": {"clip": {...}, "aesthetic": ...}, "tiles": [{"index", "prompt", "seed", "lora_tile",
"base_tile", "clip": {"lora", "base"}, "aesthetic": {"lora", "base"}}], "summary": {"clip": {"lora", "base"},
"aesthetic": {"lora", "base"}}, "intervals": {"lora": {"clip": {"mean", "low", "high", "n"}, "aesthetic": ...},
"base": {...}, "lora_minus_base": {...}}} (tile paths relative to the run directory; summary = means over tiles;
intervals: each mean's 95 % interval, kolora.core.stats, bootstrapped over the tiles = prompts × seeds, and the
paired LoRA − base difference, each LoRA tile against the base tile of the same prompt and seed).
scores.csv: index,prompt,seed,clip_lora,clip_base,aesthetic_lora,aesthetic_base.

scorers.rewards adds each reward scorer (pickscore, hps, imagereward) beside clip and aesthetic: in models, in every tile
({"lora", "base"}; both None with a "reason" when the tile's prompt has no English text it can read, see
scorers.english_prompt, and "text": the English text scored when it is not the prompt), in summary and intervals
(over the scored tiles; n counts them; absent when none was scored) and as <key>_lora,<key>_base columns.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from kolora.core import hashing
from kolora.core.errors import RunFailure
from kolora.core.rundir import atomic_dir
from kolora.core.stage import StageContext
from kolora.core.stats import mean_interval, paired_difference
from kolora.models import scorers
from kolora.models.kolors import quiet_libraries
from kolora.render.tiles import base_tiles, base_tiles_on, missing_tiles, tiles

# PIL, torch: imported in the functions that use them (a login node's CLI starts without them)

CSV_COLUMNS = ("index", "prompt", "seed", "clip_lora", "clip_base", "aesthetic_lora", "aesthetic_base")


def model_identity(folders: dict[str, Path]) -> dict[str, str]:
    """Scorer models as scores.json names them: hub ids (" + " between two CLIPs) and a fingerprint of their files."""
    return {"name": " + ".join(sorted(folders)),
            "fingerprint": hashing.digest([hashing.tree(folders[n]) for n in sorted(folders)])[:16]}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def intervals(rows: list[dict[str, Any]], rewards: tuple[str, ...] = ()
              ) -> dict[str, dict[str, dict[str, float | int]]]:
    """Per side and scorer, the mean over the tiles with its 95 % interval; and the paired LoRA − base difference
    (rows pair a LoRA tile with the base tile of its prompt and seed). A reward scorer's are over the tiles it
    scored (none scored: no interval)."""
    metrics = ("clip", "aesthetic", *(k for k in rewards if _scored(rows, k)))
    out = {side: {k: mean_interval([r[k][side] for r in _scored(rows, k)]).as_dict() for k in metrics}
           for side in ("lora", "base")}
    out["lora_minus_base"] = {k: paired_difference([r[k]["lora"] for r in _scored(rows, k)],
                                                   [r[k]["base"] for r in _scored(rows, k)]).as_dict()
                              for k in metrics}
    return out


def _scored(rows: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """The rows with a score of `metric` (a reward scorer skips prompts it cannot read)."""
    return [r for r in rows if r[metric]["lora"] is not None]


def run(ctx: StageContext) -> dict[str, Any]:
    cfg, run = ctx.cfg, ctx.run
    if not cfg.evaluate.enabled:
        return {"skipped_reason": "evaluate.enabled is false"}
    if not base_tiles_on(cfg):
        raise RunFailure("evaluate compares LoRA and base tiles, but render.base_tiles is false: set it to true "
                         "(or leave it unset) and run the render stage")
    lora_tiles, base = tiles(cfg, run), base_tiles(cfg, run)
    missing = missing_tiles(cfg, run, lora_tiles + base)
    if missing:
        raise RunFailure(f"evaluate: {len(missing)} tile(s) not rendered yet (e.g. "
                         f"{missing[0].path(run) or 'the LoRA is missing'}): run the render stage first")
    import torch
    from PIL import Image


    quiet_libraries()
    if not torch.cuda.is_available():
        torch.set_num_threads(cfg.cpu_threads)
    s = cfg.scorers
    device = cfg.evaluate.device
    try:
        loaded = scorers.load_image_scorers(s, {t.index: t.item.prompt for t in lora_tiles}, device)
    except scorers.ScorerModelError as e:
        raise RunFailure(f"evaluate: {e}") from None
    clip_names, folders, clip_models, aesthetic = loaded.clip_of, loaded.folders, loaded.clips, loaded.aesthetic
    rewards = {}
    for key in s.rewards:
        try:
            rewards[key], folders[scorers.reward_models(s, key)[0]] = scorers.load_reward(s, key, device)
        except scorers.ScorerModelError as e:
            raise RunFailure(f"evaluate: {e}") from None

    rows = []
    for n, (lt, bt) in enumerate(zip(lora_tiles, base, strict=True), 1):
        with Image.open(lt.path(run)) as li, Image.open(bt.path(run)) as bi:
            images = [li.convert("RGB"), bi.convert("RGB")]
        clip = scorers.clip_score(clip_models[clip_names[lt.index]], images, [lt.item.prompt] * 2)
        aes = scorers.aesthetic_score(aesthetic, images)
        rows.append({"index": lt.index, "prompt": lt.item.prompt, "seed": lt.item.seed,
                     "lora_tile": str(lt.path(run).relative_to(run.root)),
                     "base_tile": str(bt.path(run).relative_to(run.root)),
                     "clip": {"lora": clip[0], "base": clip[1]}, "aesthetic": {"lora": aes[0], "base": aes[1]}})
        text = scorers.english_prompt(lt.item)
        for key, model in rewards.items():
            if text is None:
                rows[-1][key] = {"lora": None, "base": None, "reason": scorers.NO_ENGLISH_PROMPT}
                continue
            values = scorers.reward_score(key, model, images, [text] * 2)
            rows[-1][key] = {"lora": values[0], "base": values[1], **({"text": text} if text != lt.item.prompt else {})}
        if ctx.progress:
            ctx.progress(n, len(lora_tiles))
    summary = {k: {side: _mean([r[k][side] for r in rows]) for side in ("lora", "base")}
               for k in ("clip", "aesthetic")}
    summary.update({k: {side: _mean([r[k][side] for r in _scored(rows, k)]) if _scored(rows, k) else None
                        for side in ("lora", "base")} for k in rewards})
    models = {"clip": model_identity({name: folders[name] for name in set(clip_names.values())}),
              "aesthetic": model_identity({s.aesthetic: folders[s.aesthetic]}),
              **{k: model_identity({m.name: folders[m.name]}) for k, m in rewards.items()}}
    _write(run.root / "eval", {"models": models, "tiles": rows, "summary": summary,
                               "intervals": intervals(rows, tuple(rewards))}, tuple(rewards))
    return {"tiles": len(rows), "clip_lora": round(summary["clip"]["lora"], 4),
            "clip_base": round(summary["clip"]["base"], 4), "aesthetic_lora": round(summary["aesthetic"]["lora"], 4),
            "aesthetic_base": round(summary["aesthetic"]["base"], 4)}


def _write(folder: Path, scores: dict[str, Any], rewards: tuple[str, ...] = ()) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS + tuple(f"{k}_{side}" for k in rewards for side in ("lora", "base")))
    for r in scores["tiles"]:
        writer.writerow([r["index"], r["prompt"], r["seed"], repr(r["clip"]["lora"]), repr(r["clip"]["base"]),
                         repr(r["aesthetic"]["lora"]), repr(r["aesthetic"]["base"]),
                         *("" if r[k][side] is None else repr(r[k][side]) for k in rewards for side in ("lora", "base"))])
    with atomic_dir(folder) as work:
        (work / "scores.json").write_text(json.dumps(scores, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (work / "scores.csv").write_text(buf.getvalue(), encoding="utf-8")
