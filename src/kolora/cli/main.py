"""The `kolora` command: its parser (each command module registers its subcommands) and the one error path
every command's exit status comes from. Starts fast on a login node: stage modules (torch, diffusers,
Data-Juicer) are imported only by the commands that run them."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback

from kolora.cli import index as cli_index  # index
from kolora.cli import models as cli_models  # fetch, check, export, import-lora
from kolora.cli import run as cli_run  # run, validate, make-tiny
from kolora.cli import slurm as cli_slurm  # submit, status, logs, cancel, resume
from kolora.cli import sweep as cli_sweep  # sweep
from kolora.core import interrupt
from kolora.core.config import ConfigError
from kolora.core.errors import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    KoloraError,
    describe_os_error,
    disk_full,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kolora", description="Kolors LoRA training kit for Slurm clusters.",
        epilog="exit status: 0 ok; 1 a failure while running; 2 input to fix (config, cluster profile, prompt set, "
               "dataset, LoRA file, run folder, argument: the message names the file and field); 3 interrupted "
               "(run the same command again to resume). Add -v to see the traceback of an error.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging; tracebacks with errors")
    sub = parser.add_subparsers(dest="command", required=True)

    cli_run.register(sub)
    cli_slurm.register(sub)
    cli_models.register(sub)
    cli_sweep.register(sub)
    cli_index.register(sub)
    for command in sub.choices.values():  # -v also after the command: `kolora run X -v`
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                             help="show the traceback of an error")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("kolora").setLevel(logging.INFO)
    for noisy in ("lightning.pytorch", "lightning.fabric", "lightning_fabric"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except interrupt.Interrupted as e:
        during = f" during {e.stage}" if e.stage else ""
        print(f"kolora: interrupted{during}: {e}. Run the same command again to resume.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except interrupt.StopNow as e:  # the second Ctrl-C: no traceback, the same exit status (outputs are atomic)
        during = f" during {e.stage}" if e.stage else ""
        kept = f" (kept: {e.kept})" if e.kept else ""
        print(f"kolora: second Ctrl-C: stopped at once{during}{kept}. Run the same command again to resume.",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except KoloraError as e:
        _explain(e, verbose, "config error" if isinstance(e, ConfigError) else "error")
        return e.exit_code
    except Exception as e:  # noqa: BLE001 - a full disk, however its writer said so; else an OSError, or a bug
        if full := disk_full(e):  # a stage's is a DiskFull already (kolora.pipeline.runner); this is any other command's
            _explain(e, verbose, "error", str(full))
            return full.exit_code
        if isinstance(e, OSError):  # a permission, a path that is not a folder
            _explain(e, verbose, "error", describe_os_error(e))
            return EXIT_FAILURE
        traceback.print_exc()
        print(f"kolora: internal error ({type(e).__name__}): this is a bug in kolora, not in your input; please "
              "report it with the traceback above", file=sys.stderr)
        return EXIT_FAILURE


def _explain(e: BaseException, verbose: bool, label: str, text: str | None = None) -> None:
    if verbose:
        traceback.print_exc()
    notes = "".join(f"\n  {note}" for note in getattr(e, "__notes__", []))
    print(f"kolora: {label}: {text or e}{notes}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
