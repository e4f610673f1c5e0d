"""Prompt sets (configs/prompts/*.yaml): the prompts and seeds render, validation and evaluate use."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import Field, ValidationError

from kolora.core.errors import ConfigError, InputError, read_text
from kolora.core.schema import Section as _Section
from kolora.core.schema import Seed, describe_validation_error, format_problems


class PromptItem(_Section):
    prompt: str = Field(min_length=1)
    seed: Seed
    negative_prompt: str | None = None
    # An English gloss of the prompt, read by the English-only reward scorers (scorers.rewards) instead of it
    prompt_en: str | None = Field(None, min_length=1)


class PromptSet(_Section):
    negative_prompt: str | None = None
    prompts: list[PromptItem] = Field(min_length=1)


def load_prompts(path: Path, default_negative: str) -> list[PromptItem]:
    """Prompt set → items with their negative prompt filled in (item, else file default, else config default)."""
    if not Path(path).exists():
        raise ConfigError(f"render.prompts: prompt file {path} does not exist (see configs/prompts/anime-story.yaml)")
    try:
        raw = yaml.safe_load(read_text(path))
        ps = PromptSet.model_validate(raw)
    except InputError as e:
        raise ConfigError(f"render.prompts: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"render.prompts: {path} is not valid YAML: {e}") from None
    except ValidationError as e:
        problems = describe_validation_error(e, PromptSet)
        raise ConfigError(format_problems(f"render.prompts: {path}", "prompt set", problems)) from None
    neg = ps.negative_prompt if ps.negative_prompt is not None else default_negative
    return [p.model_copy(update={"negative_prompt": p.negative_prompt if p.negative_prompt is not None else neg})
            for p in ps.prompts]


def repeated(prompts: list[PromptItem]) -> list[tuple[int, int]]:
    """(first, repeat), 1-based, for each item with the prompt, negative prompt and seed of an earlier one:
    the same picture rendered twice (a different negative prompt is a comparison, not a repeat)."""
    first: dict[tuple[str, str | None, int], int] = {}
    out = []
    for i, p in enumerate(prompts, 1):
        key = (p.prompt, p.negative_prompt, p.seed)
        if key in first:
            out.append((first[key], i))
        else:
            first[key] = i
    return out
