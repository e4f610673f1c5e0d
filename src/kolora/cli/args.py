"""What the commands' arguments share: a config and its overrides, the runs dir, whole-number options."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from kolora.core.errors import InputError


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment YAML (e.g. configs/demo.yaml)")
    p.add_argument("--name", help="run name (default: the config's name)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config field, e.g. --set train.steps=200 (repeatable)")
    p.add_argument("--runs-dir", help="where run directories go (default: $KOLORA_RUNS or ./runs)")


def resolve_runs_dir(args) -> Path:
    given = args.runs_dir or os.environ.get("KOLORA_RUNS")
    path = Path(given or "runs").expanduser().resolve()
    if path.exists() and not path.is_dir():
        where = "--runs-dir" if args.runs_dir else "$KOLORA_RUNS" if given else "./runs"
        raise InputError(f"{where} {path} is a file, not a folder; give a folder for the run directories")
    return path


def whole_number(minimum: int):
    """An argparse type: an integer >= minimum."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text} must be {minimum} or more")
        return value
    return parse
