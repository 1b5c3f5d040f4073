"""``python -m detkit.config.show KEY [KEY=VALUE ...]``: print one composed, validated value, with any
overrides applied (the Makefile reads settings so)."""

from __future__ import annotations

import sys

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from detkit.config.cli import command_parser, load, run_command
from detkit.config.errors import ConfigError, closest


def show(args) -> None:
    cfg = load(args)
    absent = object()
    try:
        value = OmegaConf.select(cfg, args.key, default=absent, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{args.key}: {exc}") from None
    if value is absent:
        parent, _, leaf = args.key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        hint = closest(leaf, [str(k) for k in node.keys()]) if isinstance(node, DictConfig) else ""
        raise ConfigError(f"no config key '{args.key}'{hint}")
    print(OmegaConf.to_yaml(value).strip() if isinstance(value, (DictConfig, ListConfig))
          else "null" if value is None else value)


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("detkit.config.show", __doc__)
    parser.add_argument("key", help="dotted key, e.g. export.model_name")
    return run_command(parser, argv, show)


if __name__ == "__main__":
    sys.exit(main())
