"""Compose and validate the experiment config: ``params.yaml`` plus the ``conf/`` groups.

``params.yaml`` is what users edit and what DVC tracks. A key that names a config group
(``dataset: sample``) is replaced by the body of ``conf/<group>/<name>.yaml``. The result
is checked once, before any work, against the dataclass schema below: unknown keys fail
with the closest valid key, missing ``???`` values fail by name, and types are coerced
or refused by OmegaConf.

DVC's own Hydra mode stays off on purpose (it rewrites ``params.yaml`` on ``dvc exp
run``), so composition happens here with OmegaConf rather than ``@hydra.main``.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

GROUPS = ("dataset",)


class ConfigError(ValueError):
    """A config problem, phrased for the user: which file, which key, what to do."""


@dataclass
class Archive:
    name: str = MISSING
    urls: list[str] = MISSING
    size: int | None = None
    sha256: str = MISSING


@dataclass
class Dataset:
    name: str = MISSING
    layout: str = "pets"
    archives: list[Archive] = field(default_factory=list)
    local_dir: str | None = None
    label_map: str | None = None


@dataclass
class Split:
    train_fraction: float = 0.7
    seed: int = 42


@dataclass
class TFRecord:
    train_shards: int = 4
    val_shards: int = 2


@dataclass
class Config:
    dataset: Dataset = field(default_factory=Dataset)
    split: Split = field(default_factory=Split)
    tfrecord: TFRecord = field(default_factory=TFRecord)


LAYOUTS = ("pets", "voc")


def repo_root() -> Path:
    """The repository root: DVC exports DVC_ROOT to stage commands; otherwise the cwd."""
    return Path(os.environ.get("DVC_ROOT", ".")).resolve()


def closest(word: str, choices: list[str]) -> str:
    match = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _check_keys(node: Any, schema: Any, where: str, prefix: str) -> None:
    """Refuse keys the schema does not know, naming the closest one that it does."""
    if isinstance(node, DictConfig) and isinstance(schema, DictConfig):
        known = [str(k) for k in schema.keys()]
        for key in node.keys():
            full = f"{prefix}{key}"
            if str(key) not in known:
                raise ConfigError(f"{where}: unknown key '{full}'{closest(str(key), known)}")
            _check_keys(node._get_node(key), schema._get_node(key), where, f"{full}.")
    elif isinstance(node, ListConfig) and isinstance(schema, ListConfig):
        element = schema._metadata.element_type
        if element is not Any and hasattr(element, "__dataclass_fields__"):
            element_schema = OmegaConf.structured(element)
            for i, item in enumerate(node):
                _check_keys(item, element_schema, where, f"{prefix[:-1]}[{i}].")


def _load_yaml(path: Path) -> DictConfig:
    try:
        loaded = OmegaConf.load(path)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    except Exception as exc:  # yaml.YAMLError and friends: name the file either way
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return loaded


def _load_group(conf_dir: Path, group: str, name: Any) -> DictConfig:
    if not isinstance(name, str) or not name:
        raise ConfigError(f"params.yaml: '{group}' must name a file in {conf_dir / group}/")
    options = sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))
    path = conf_dir / group / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"params.yaml: {group}={name}: no such config file {path}{closest(name, options)}; "
            f"choose one of: {', '.join(options)}"
        )
    body = _load_yaml(path)
    body.name = name
    return body


def load_config(
    params: str | Path = "params.yaml",
    conf_dir: str | Path = "conf",
    overrides: list[str] | None = None,
) -> DictConfig:
    """Compose params.yaml with its config groups, apply ``a.b=c`` overrides, validate.

    Relative paths are taken from the repository root, so stages work from any cwd.
    """
    root = repo_root()
    params_path = root / params
    conf_path = root / conf_dir
    if not params_path.is_file():
        raise ConfigError(f"{params_path}: params file not found")
    user = _load_yaml(params_path)
    # Group picks (dataset=sample) first, so that dataset.x=y then edits the picked body.
    overrides = overrides or []
    picks = [o for o in overrides if o.split("=", 1)[0] in GROUPS]
    edits = [o for o in overrides if o not in picks]
    user = OmegaConf.merge(user, OmegaConf.from_dotlist(picks))
    schema = OmegaConf.structured(Config)
    for group in GROUPS:
        if group in user:
            body = _load_group(conf_path, group, user[group])
            _check_keys(body, schema[group], str(conf_path / group / f"{user[group]}.yaml"), "")
            user[group] = body
    user = OmegaConf.merge(user, OmegaConf.from_dotlist(edits))
    _check_keys(user, schema, str(params_path), "")
    try:
        cfg = OmegaConf.merge(schema, user)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{params_path}: {exc}") from exc
    # A ??? in the user's files does not override a schema default when merged: check both.
    missing = sorted(OmegaConf.missing_keys(user) | OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(
            f"required config values are not set (marked ???): {', '.join(missing)}; "
            "set them in params.yaml or the group file"
        )
    _validate_values(cfg)
    return cfg


def _validate_values(cfg: DictConfig) -> None:
    if cfg.dataset.layout not in LAYOUTS:
        raise ConfigError(
            f"dataset.layout: '{cfg.dataset.layout}' is not one of {', '.join(LAYOUTS)}"
            f"{closest(cfg.dataset.layout, list(LAYOUTS))}"
        )
    if not 0.0 < cfg.split.train_fraction < 1.0:
        raise ConfigError(f"split.train_fraction: {cfg.split.train_fraction} must be in (0, 1)")
    for key in ("train_shards", "val_shards"):
        if cfg.tfrecord[key] < 1:
            raise ConfigError(f"tfrecord.{key}: {cfg.tfrecord[key]} must be at least 1")
