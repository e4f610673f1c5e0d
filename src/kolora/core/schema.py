"""What the experiment config and the cluster profile schemas share: a strict section base class, and turning
a pydantic ValidationError into lines a researcher can act on (field, what was found, what is allowed).
"""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Callable
from difflib import get_close_matches
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator


def _members(annotation: Any) -> tuple[Any, ...]:
    """The types a field accepts at its top level (union members, Optional unwrapped)."""
    if typing.get_origin(annotation) is typing.Annotated:
        return _members(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return tuple(m for a in typing.get_args(annotation) for m in _members(a))
    return (annotation,)


class Section(BaseModel):
    """A config section: unknown keys refused; true/false refused where a number is expected (pydantic would
    read `steps: true` as 1)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool) and info.field_name in cls.model_fields:
            members = _members(cls.model_fields[info.field_name].annotation)
            if (int in members or float in members) and bool not in members and Any not in members:
                raise ValueError(f"must be a number, got {str(value).lower()}")
        return value


# The largest seed: a signed 64-bit integer, what every consumer of a seed (torch generators, numpy, parquet,
# JSON readers in other languages) holds without wrapping; a negative seed would wrap to a large one in torch.
MAX_SEED = 2**63 - 1


def _seed_in_range(value: int) -> int:
    if not 0 <= value <= MAX_SEED:
        raise ValueError(f"must be a whole number from 0 to 2^63 - 1 ({MAX_SEED})")
    return value


Seed = Annotated[int, AfterValidator(_seed_in_range)]


# ---- ValidationError → lines --------------------------------------------------------------------------------
_TAG = re.compile(r"^(int|float|str|bool|bytes|none|[a-z][a-z-]*\[.*\])$", re.S)
_PATTERNS = {r"^[A-Za-z0-9][A-Za-z0-9._-]*$": "must start with a letter or digit and hold only letters, digits, "
                                                "'.', '_' and '-'"}


def _model_of(annotation: Any) -> type[BaseModel] | None:
    for m in _members(annotation):
        if isinstance(m, type) and issubclass(m, BaseModel):
            return m
    return None


def _walk(model: type[BaseModel], loc: tuple[Any, ...]) -> tuple[tuple[Any, ...], type[BaseModel] | None]:
    """pydantic's error location without its union-branch tags (`defaults.time.int` → `defaults.time`), and
    the section holding the last part (for "did you mean")."""
    clean: list[Any] = []
    current: Any = model
    parent: type[BaseModel] | None = model
    for part in loc:
        section = _model_of(current) if current is not None else None
        if section is not None:
            parent = section
            clean.append(part)
            current = section.model_fields[part].annotation if part in section.model_fields else None
            continue
        origin = typing.get_origin(current)
        members = [m for m in _members(current) if m is not type(None)] if current is not None else []
        if origin in (list, tuple) or any(typing.get_origin(m) in (list, tuple) for m in members):
            seq = next(m for m in [current, *members] if typing.get_origin(m) in (list, tuple))
            clean.append(part)
            current = (typing.get_args(seq) or (None,))[0] if isinstance(part, int) else None
            continue
        if origin is dict or any(typing.get_origin(m) is dict for m in members):
            mapping = next(m for m in [current, *members] if typing.get_origin(m) is dict)
            clean.append(part)
            current = typing.get_args(mapping)[1] if typing.get_args(mapping) else None
            continue
        if isinstance(part, str) and _TAG.match(part):
            continue  # a union branch's name, not a field
        clean.append(part)
        current = None
    return tuple(clean), parent


def _message(e: dict[str, Any], key: Any, parent: type[BaseModel] | None) -> tuple[str, bool]:
    """(what is wrong, whether to show the value given)."""
    kind = e["type"]
    if kind == "extra_forbidden":
        fields = list(parent.model_fields) if parent is not None else []
        close = get_close_matches(str(key), fields, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}?" if close else f"the fields here are {', '.join(fields)}"
        return f"unknown field; {hint}", False
    if kind == "missing":
        return "required field is missing", False
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return "must be a mapping of `key: value` lines", True
    if kind == "string_pattern_mismatch":
        pattern = (e.get("ctx") or {}).get("pattern", "")
        return _PATTERNS.get(pattern, f"must match the pattern {pattern}"), True
    msg = str(e["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    msg = re.sub(r"^Input should be ", "must be ", msg)
    msg = re.sub(r"instance of [A-Z]\w*", "a mapping", msg)  # no internal class names
    return msg, True


def _shown(value: Any) -> str:
    text = repr(value)
    if isinstance(value, bool) or value is None:
        text = {True: "true", False: "false", None: "null"}[value]
    return text if len(text) <= 80 else text[:77] + "..."


def describe_validation_error(err: ValidationError, model: type[BaseModel],
                              origin: Callable[[tuple[Any, ...]], str | None] | None = None) -> list[tuple[str, str]]:
    """[(where, "field: what is wrong (got X)")], one per problem. Branches of a union that failed for the same
    field become one line; `origin(loc)` names where a field's value came from (a --set), else ""."""
    grouped: dict[tuple[Any, ...], tuple[list[str], Any, bool]] = {}
    for e in err.errors():
        loc, parent = _walk(model, tuple(e["loc"]))
        msg, show = _message(e, loc[-1] if loc else None, parent)
        given = e.get("input")
        show = show and not isinstance(given, dict) and "got " not in msg
        msgs, _, shown = grouped.get(loc, ([], given, True))
        msgs += [line for line in msg.splitlines() if line not in msgs]
        grouped[loc] = (msgs, given, shown and show)
    out: list[tuple[str, str]] = []
    for loc, (msgs, given, show) in grouped.items():
        field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "(top level)"
        where = (origin(loc) if origin else None) or ""
        out += [(where, m) for m in msgs if _names_a_field(m)]  # model-level checks name their own field
        rest = [m for m in msgs if not _names_a_field(m)]
        if rest:
            out.append((where, f"{field}: {'; or '.join(rest)}" + (f" (got {_shown(given)})" if show else "")))
    return out


def _names_a_field(msg: str) -> bool:
    return bool(re.match(r"^[a-z_]+(\.[a-z_0-9\[\]]+)+[:\s]", msg))


def format_problems(source: str, what: str, problems: list[tuple[str, str]]) -> str:
    """One line for one problem (`base.yaml: train.steps: ...`), else a header and one line per problem; a
    problem that comes from a --set/--name starts with it instead of the file."""
    if len(problems) == 1:
        where, text = problems[0]
        return f"{where or source}: {text}"
    overridden = " and its --set/--name values" if any(where for where, _ in problems) else ""
    return f"{source}{overridden}: invalid {what} ({len(problems)} problems)\n" + "\n".join(
        f"  {where + ': ' if where else ''}{text}" for where, text in problems)
