"""Every program's command line has one shape: its own arguments in argparse (paths, IMAGE, ``--url``,
TF Serving's flags), ``--params``, then config overrides in Hydra's grammar as trailing ``KEY=VALUE``
positionals, composed and validated before any work; and every error a user can fix is one line on
stderr, ``error: ...`` naming the key, file or request at fault, and exit status 2 (argparse's status
for bad usage).

Overrides: ``group=name`` switches a group file (``model=retinanet_tiny``), ``a.b=c`` sets a key
(``train.steps=10``, ``deploy.region=eu-west-1``), ``+a.b=c`` adds one, ``~a.b`` removes one. A
positional is an override by its form, wherever it stands: ``KEY=VALUE`` with KEY a dotted name (after
an optional ``+``, ``++`` or ``~``), unless it is an option's value (``--out a=b.png``) or comes after
``--``; so a path of that form goes after ``--``, or as ``./a=b.png``.

Overrides change this one run only (``python -m stages.train ... train.steps=10
model=retinanet_tiny``); DVC records ``params.yaml``, so an experiment that DVC should track goes
through ``dvc exp run -S key=value`` instead."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NoReturn

from omegaconf import DictConfig

from detkit.config.compose import load_config
from detkit.config.errors import ConfigError
from detkit.config.workspace import workspace_root

USER_ERROR = 2
# Hydra's key: an ID ([A-Za-z_$][A-Za-z0-9_$-]*), dotted, optionally @package.
_KEY = r"[A-Za-z_$][\w$-]*(?:\.[\w$-]+)*(?:@[\w$.-]*)?"
OVERRIDE = re.compile(rf"(?:\+\+?)?{_KEY}=.*|~{_KEY}(?:=.*)?", re.S)
OVERRIDES_HELP = ("config overrides for this run only, in Hydra's grammar: group=name (model=retinanet_tiny), "
                  "key=value (train.steps=10), +key=value adds a key, ~key removes one")
Errors = tuple[type[Exception], ...] | Callable[[], tuple[type[Exception], ...]]


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors follow the convention too: one line, status 2.

    Abbreviated options are off: which token is an option's value (and so never an override) is
    known by the option's full name."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(USER_ERROR, f"error: {message} (usage: {self.prog} --help)\n")


def command_parser(module: str, doc: str | None) -> Parser:
    """The parser of ``python -m <module>``, with ``--params``; the overrides are added by ``parse``."""
    parser = Parser(prog=f"python -m {module}", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="experiment params file (from the repo root)")
    return parser


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    # A subcommand's aliases name the same parser: each once.
    return list({id(sub): sub for action in parser._actions if isinstance(action, argparse._SubParsersAction)
                 for sub in action.choices.values()}.values())


def _leaves(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """The parsers that end a command line: the subcommands', or the parser itself."""
    subs = _subparsers(parser)
    if not subs:
        yield parser
    for sub in subs:
        yield from _leaves(sub)


def _values_taken(parser: argparse.ArgumentParser) -> dict[str, int]:
    """Option string -> how many tokens after it are its values, over the parser and its subcommands."""
    taken = {}
    for action in parser._actions:
        if action.option_strings and (action.nargs is None or isinstance(action.nargs, int)):
            taken.update(dict.fromkeys(action.option_strings, 1 if action.nargs is None else action.nargs))
    for sub in _subparsers(parser):
        taken.update(_values_taken(sub))
    return taken


def split_overrides(parser: argparse.ArgumentParser, argv: Iterable[str]) -> tuple[list[str], list[str]]:
    """``argv`` as (the parser's own arguments, the overrides): the positionals of KEY=VALUE form."""
    taken = _values_taken(parser)
    own: list[str] = []
    overrides: list[str] = []
    values = 0
    tokens = list(argv)
    for i, token in enumerate(tokens):
        if values:
            values -= 1
            own.append(token)
        elif token == "--":
            own.extend(tokens[i:])
            break
        elif OVERRIDE.fullmatch(token):
            overrides.append(token)
        else:
            values = taken.get(token, 0)
            own.append(token)
    return own, overrides


def parse(parser: argparse.ArgumentParser, argv: Iterable[str] | None) -> argparse.Namespace:
    """``argv`` (default: the command line) parsed; ``args.overrides`` holds the overrides."""
    own, overrides = split_overrides(parser, sys.argv[1:] if argv is None else argv)
    # Added last, so that --help lists them after the program's own positionals.
    for leaf in _leaves(parser):
        leaf.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE", help=OVERRIDES_HELP)
    args = parser.parse_args(own)
    if args.overrides:  # a positional the program has no place for, not of KEY=VALUE form either
        parser.error(f"unexpected argument '{args.overrides[0]}': config overrides are KEY=VALUE "
                     "(e.g. train.steps=10)")
    args.overrides = overrides
    return args


def load(args: argparse.Namespace) -> DictConfig:
    """The composed, validated config of ``--params`` with the overrides; ConfigError names what is wrong."""
    return load_config(args.params, overrides=args.overrides)


def export_folder(cfg: DictConfig) -> Path:
    """Where the export stage writes the configured model (dvc.yaml's ``models/export``), which the serving
    commands read by default."""
    return workspace_root() / "models" / "export" / cfg.export.model_name


def fail(problem: object) -> int:
    """Print ``error: <problem>`` as one line on stderr; the status of a user error."""
    print("error: " + " ".join(str(problem).split()), file=sys.stderr)
    return USER_ERROR


def run_command(parser: argparse.ArgumentParser, argv: Iterable[str] | None,
                call: Callable[[argparse.Namespace], int | None], errors: Errors = ()) -> int:
    """Parse ``argv``, then ``call(args)`` (its status; None is 0): a ConfigError or one of ``errors`` is
    one line and status 2. ``errors`` may be a function returning them, for error classes whose modules
    import TensorFlow: it is called only once something other than a ConfigError is raised."""
    args = parse(parser, argv)
    try:
        return call(args) or 0
    except ConfigError as exc:
        return fail(exc)
    except Exception as exc:
        if isinstance(exc, errors() if callable(errors) else errors):
            return fail(exc)
        raise


def run_stage(parser: argparse.ArgumentParser, argv: Iterable[str] | None,
              call: Callable[[DictConfig, argparse.Namespace], Any], errors: Errors = ()) -> int:
    """``run_command`` for a stage: ``call(cfg, args)`` with the config loaded first; its result is not a status."""

    def staged(args: argparse.Namespace) -> int:
        call(load(args), args)
        return 0

    return run_command(parser, argv, staged, errors)
