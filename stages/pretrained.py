"""DVC stage ``pretrained``: bring the model's starting weights into ``models/pretrained/``.

``model.pretrained`` names the source; the output is always a local KerasHub preset folder
(``config.json``, ``metadata.json``, ``task.json``, ``*.weights.h5``) that the train stage
loads with ``from_preset`` (whatever KerasHub task the preset holds, as its ``task.json`` names it:
a RetinaNet object detector, an ImageNet ResNet classifier), plus ``source.json`` saying where it
came from:

- ``none``: a from-scratch model; only ``source.json`` is written.
- a KerasHub preset handle (``kaggle://...``, ``hf://...``) or a local preset folder:
  loaded with KerasHub (which downloads and caches hub presets) and saved as a local preset.
- an ``http(s)://`` or ``file://`` URL, or a local path, of a ``.tar.gz`` of a saved preset:
  fetched with the download stage's code (mirrors, resume, size + ``pretrained_sha256``
  check) and extracted safely.

Either way the preset is loaded once before it is written, so a broken one fails here, not
an hour into training.

    python -m stages.pretrained --out models/pretrained --cache data/downloads
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from detkit.config import ConfigError, workspace_root
from detkit.config.cli import command_parser, run_stage
from detkit.core.fsio import atomic_dir, atomic_write_json
from detkit.data.archive import ArchiveError, archive_suffix, fetch, safe_extract

HUB_SCHEMES = ("kaggle://", "hf://", "modelscope://")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")


class PretrainedError(RuntimeError):
    pass


def source_kind(source: str) -> str:
    """``none``, ``hub`` (KerasHub handle or preset folder) or ``archive`` (fetched + extracted)."""
    if source == "none":
        return "none"
    if source.startswith(HUB_SCHEMES):
        return "hub"
    if source.endswith(ARCHIVE_SUFFIXES):
        return "archive"
    path = Path(source) if Path(source).is_absolute() else workspace_root() / source
    if path.is_dir():
        return "hub"
    raise ConfigError(
        f"model.pretrained: '{source}' is not 'none', a KerasHub handle ({', '.join(HUB_SCHEMES)}), "
        f"an archive URL or path ({', '.join(ARCHIVE_SUFFIXES)}), or an existing preset folder"
    )


def _preset_dir(root: Path) -> Path:
    """The folder inside an extracted archive that holds the preset (its config.json)."""
    configs = sorted(root.rglob("config.json"), key=lambda p: len(p.parts))
    if not configs:
        raise PretrainedError(f"{root}: the archive holds no KerasHub preset (no config.json)")
    return configs[0].parent


def _load_and_save(handle: str, out: Path) -> dict[str, Any]:
    """Load a preset with KerasHub (proving it is usable) as the task it holds (an object detector, or an
    image classifier whose backbone a family starts from) and save it as a local preset."""
    import keras_hub
    from keras_hub.src.utils.preset_utils import TASK_CONFIG_FILE, check_config_class, check_file_exists, load_json

    try:
        kind = (check_config_class(load_json(handle, TASK_CONFIG_FILE)) if check_file_exists(handle, TASK_CONFIG_FILE)
                else keras_hub.models.Backbone)
        task = kind.from_preset(handle)
    except Exception as exc:  # KerasHub raises many types; all mean the same here
        raise PretrainedError(f"model.pretrained: cannot load preset '{handle}': {exc}") from exc
    task.save_to_preset(str(out))
    return {"class": type(task).__name__, "parameters": int(task.count_params())}


def run(cfg: DictConfig, inputs: dict[str, Path], outputs: dict[str, Path]) -> dict[str, Any]:
    """Fill ``outputs['pretrained']``; ``inputs['cache']`` keeps downloaded archives."""
    source = cfg.model.pretrained
    kind = source_kind(source)
    summary: dict[str, Any] = {"model": cfg.model.name, "source": source, "kind": kind}
    out = Path(outputs["pretrained"])
    with atomic_dir(out) as tmp:
        if kind == "hub":
            local = Path(source) if Path(source).is_absolute() else workspace_root() / source
            summary.update(_load_and_save(str(local) if local.is_dir() else source, tmp))
        elif kind == "archive":
            if not cfg.model.pretrained_sha256:
                raise ConfigError(f"conf/model/{cfg.model.name}.yaml: pretrained_sha256 is required for the "
                                  f"archive '{source}' (its sha256, so a corrupt download is never trained on)")
            got = fetch([source], Path(inputs["cache"]) / f"pretrained-{cfg.model.name}{archive_suffix(source)}",
                        None, cfg.model.pretrained_sha256, label=f"pretrained {cfg.model.name}")
            with tempfile.TemporaryDirectory(dir=out.parent) as scratch:
                safe_extract(got.path, Path(scratch))
                summary.update(_load_and_save(str(_preset_dir(Path(scratch))), tmp))
            summary["sha256"] = got.sha256
        atomic_write_json(tmp / "source.json", summary)
    print(f"pretrained: {cfg.model.name}: {source} -> {out}" + (
        f" ({summary['class']}, {summary['parameters']:,} parameters)" if "class" in summary else ""))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("stages.pretrained", __doc__)
    parser.add_argument("--out", type=Path, required=True, help="preset folder to write")
    parser.add_argument("--cache", type=Path, required=True, help="download cache folder (kept across runs)")
    root = workspace_root()
    return run_stage(parser, argv, lambda cfg, args: run(cfg, {"cache": root / args.cache},
                                                         {"pretrained": root / args.out}),
                     errors=(ArchiveError, PretrainedError))


if __name__ == "__main__":
    sys.exit(main())
