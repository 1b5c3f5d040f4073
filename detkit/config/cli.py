"""Every stage's command line has one shape: its paths as arguments (declared in dvc.yaml),
optional overrides in Hydra's grammar, the config composed and validated, the stage's ``run``
called, and the errors a user can fix turned into one line on stderr and exit status 2
(argparse's status for bad usage).

Overrides change this one run only (``python -m stages.train ... train.steps=10
model=retinanet_tiny``); DVC records ``params.yaml``, so an experiment that DVC should track
goes through ``dvc exp run -S key=value`` instead."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable
from typing import Any

from detkit.config import ConfigError, load_config

USER_ERROR = 2


def stage_parser(module: str, doc: str, overrides: bool = True) -> argparse.ArgumentParser:
    """The shared arguments; ``overrides=False`` for commands whose positionals are subcommands."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="experiment params file (from the repo root)")
    if overrides:
        parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                            help="Hydra overrides for this run only: group=name (model=retinanet_tiny), "
                                 "key=value (train.steps=10), +key=value adds a key")
    return parser


def run_stage(parser: argparse.ArgumentParser, argv: Iterable[str] | None,
              call: Callable[[Any, argparse.Namespace], Any], errors: tuple[type[Exception], ...] = ()) -> int:
    """Parse ``argv``, load the config, ``call(cfg, args)``; ``errors`` (and config errors) -> status 2."""
    args = parser.parse_args(None if argv is None else list(argv))
    try:
        call(load_config(args.params, overrides=args.overrides), args)
    except (ConfigError, *errors) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USER_ERROR
    return 0
