"""The experiment config: ``params.yaml`` + ``conf/`` groups, composed (``compose``), typed (``schema``),
checked (``validate``); where a run reads and writes (``workspace``); the command-line convention (``cli``)."""

from detkit.config.compose import GROUPS, load_config
from detkit.config.errors import ConfigError, closest
from detkit.config.workspace import repo_root, workspace_root

__all__ = ["GROUPS", "ConfigError", "closest", "load_config", "repo_root", "workspace_root"]
