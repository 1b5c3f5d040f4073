"""``python -m detkit.config.show KEY``: print one composed, validated value (the Makefile reads settings so)."""

from __future__ import annotations

import argparse
import sys

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from detkit.config.compose import load_config
from detkit.config.errors import ConfigError, closest


def main(argv: list[str] | None = None) -> int:
    """``python -m detkit.config.show KEY``: print one composed, validated value (for the Makefile)."""

    parser = argparse.ArgumentParser(prog="python -m detkit.config.show", description=main.__doc__)
    parser.add_argument("key", help="dotted key, e.g. export.model_name")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.params)
        absent = object()
        value = OmegaConf.select(cfg, args.key, default=absent, throw_on_missing=True)
    except (ConfigError, OmegaConfBaseException) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if value is absent:
        parent, _, leaf = args.key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        hint = closest(leaf, [str(k) for k in node.keys()]) if isinstance(node, DictConfig) else ""
        print(f"error: no config key '{args.key}'{hint}", file=sys.stderr)
        return 2
    print(OmegaConf.to_yaml(value).strip() if isinstance(value, (DictConfig, ListConfig))
          else "null" if value is None else value)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
