"""Compose and validate the experiment config: ``params.yaml`` plus the ``conf/`` groups.

``params.yaml`` is what users edit and what DVC tracks. A key that names a config group
(``dataset: sample``) is replaced by the body of ``conf/<group>/<name>.yaml``. Hydra's
compose API does the composition, with ``params.yaml`` as the primary config and its group
keys as the defaults list, so overrides in Hydra's grammar work the same on every stage's
command line (``python -m stages.train train.steps=10 model=retinanet_tiny``). The result is
checked once, before any work, against the dataclass schema below: unknown keys fail with
the closest valid key, missing ``???`` values fail by name, and types are coerced or
refused by OmegaConf.

DVC's own Hydra mode stays off on purpose (it rewrites ``params.yaml`` on ``dvc exp
run``, losing hand edits), and ``@hydra.main`` is not used (it owns the working directory
and logging): the stages call ``compose`` themselves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from detkit.config.errors import ConfigError, closest
from detkit.config.schema import COMPUTE_SCHEMAS, MODEL_SCHEMAS, Config
from detkit.config.validate import validate_values
from detkit.config.workspace import workspace_root

GROUPS = ("dataset", "model", "compute", "deploy")
PRIMARY = "detkit_params"  # params.yaml's name in Hydra's config store


def _check_keys(node: Any, schema: Any, where: str, prefix: str) -> None:
    """Refuse keys the schema does not know, naming the closest one that it does."""
    if isinstance(node, DictConfig) and isinstance(schema, DictConfig):
        if schema._is_missing() or schema._is_none():  # no value in the schema: the keys of its declared type
            declared = schema._metadata.ref_type
            if not hasattr(declared, "__dataclass_fields__"):  # a free mapping (e.g. deploy.instances): any keys
                return
            schema = OmegaConf.structured(declared)
        if OmegaConf.get_type(schema) is dict:
            return
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


def load_config(
    params: str | Path = "params.yaml",
    conf_dir: str | Path = "conf",
    overrides: list[str] | None = None,
) -> DictConfig:
    """Compose params.yaml with its config groups, apply Hydra overrides, validate.

    ``overrides`` use Hydra's grammar: ``group=name`` switches a group file
    (``model=retinanet_tiny``), ``a.b=c`` sets a key (``train.steps=10``,
    ``model.image_size=256``), ``+a.b=c`` adds one. Relative paths are taken from the
    repository root, so stages work from any cwd.
    """
    root = workspace_root()
    params_path = root / params
    conf_path = root / conf_dir
    if not params_path.is_file():
        raise ConfigError(f"{params_path}: params file not found")
    user = _load_yaml(params_path)
    _check_keys(user, OmegaConf.structured(Config), str(params_path), "")
    composed = _compose(user, params_path, conf_path, list(overrides or []))
    choices = composed.hydra.runtime.choices
    OmegaConf.set_struct(composed, False)
    del composed["hydra"]
    schema = OmegaConf.structured(Config)
    for group in GROUPS:
        if group in composed:
            path = conf_path / group / f"{choices[group]}.yaml"
            body = _load_yaml(path)
            schema[group] = _group_schema(group, choices[group], composed[group], path)
            _check_keys(body, schema[group], str(path), "")
            composed[group].name = choices[group]
    # Keys added with + by an override, which no file holds.
    _check_keys(composed, schema, "override", "")
    try:
        cfg = OmegaConf.merge(schema, composed)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{params_path}: {exc}") from exc
    # A ??? in the user's files does not override a schema default when merged: check both.
    missing = sorted(OmegaConf.missing_keys(composed) | OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(
            f"required config values are not set (marked ???): {', '.join(missing)}; "
            "set them in params.yaml or the group file"
        )
    validate_values(cfg)
    return cfg


def _group_schema(group: str, choice: str, body: DictConfig, path: Path) -> DictConfig:
    """The schema of a group file: a model file's by its ``family``, a compute file's by its name."""
    if group == "model":
        family = body.get("family")
        if family not in MODEL_SCHEMAS:
            raise ConfigError(f"{path}: family '{family}' is not one of {', '.join(MODEL_SCHEMAS)}"
                              f"{closest(str(family), list(MODEL_SCHEMAS))}")
        return OmegaConf.structured(MODEL_SCHEMAS[family])
    if group == "compute":
        if choice not in COMPUTE_SCHEMAS:
            raise ConfigError(f"{path}: compute '{choice}' is not one of {', '.join(COMPUTE_SCHEMAS)} (each needs "
                              "its runner in the train stage)")
        return OmegaConf.structured(COMPUTE_SCHEMAS[choice])
    return OmegaConf.structured(Config)[group]


def _compose(user: DictConfig, params_path: Path, conf_path: Path, overrides: list[str]) -> DictConfig:
    """Hydra's compose API over params.yaml as the primary config, its group keys as the defaults list."""
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.errors import HydraException
    from omegaconf.errors import ConfigKeyError

    defaults = []
    for group in GROUPS:
        if group in user:
            name = user.pop(group)
            if not isinstance(name, str) or not name:
                raise ConfigError(f"{params_path}: '{group}' must name a file in {conf_path / group}/")
            defaults.append({group: name})
    primary = OmegaConf.merge({"defaults": [*defaults, "_self_"]}, user)
    ConfigStore.instance().store(name=PRIMARY, node=primary)
    with initialize_config_dir(config_dir=str(conf_path), version_base=None):
        try:
            return compose(config_name=PRIMARY, overrides=overrides, return_hydra_config=True)
        except (HydraException, ConfigKeyError) as exc:
            raise ConfigError(_explain(exc, primary, conf_path, overrides)) from None


def _explain(exc: Exception, primary: DictConfig, conf_path: Path, overrides: list[str]) -> str:
    """Hydra's complaint, phrased with the file or key at fault and the closest valid choice."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as parse_error:
        return f"override: {parse_error}"
    picks = {g: next(iter(d.values())) for d in primary.defaults if isinstance(d, DictConfig) for g in d}
    for override in parsed:
        if override.key_or_group in GROUPS:
            picks[override.key_or_group] = override.value()
    for group, name in picks.items():
        options = sorted(p.stem for p in (conf_path / group).glob("*.yaml"))
        if name not in options:
            return (f"{group}={name}: no such config file {conf_path / group / f'{name}.yaml'}"
                    f"{closest(str(name), options)}; choose one of: {', '.join(options)}")
    # Otherwise a key that exists nowhere: name the first missing part and its closest sibling.
    known = OmegaConf.structured(Config)
    for override in parsed:
        if override.key_or_group in GROUPS or override.is_add():
            continue
        node, done = known, []
        for part in override.key_or_group.split("."):
            if not isinstance(node, DictConfig) or OmegaConf.get_type(node) is dict:
                break
            if part not in node:
                choices = [str(k) for k in node.keys()]
                return (f"override '{override.input_line}': unknown key '{'.'.join([*done, part])}'"
                        f"{closest(part, choices)}")
            node, done = node._get_node(part), [*done, part]
    return f"{exc}"


