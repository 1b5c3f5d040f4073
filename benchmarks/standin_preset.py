"""A local stand-in for a KerasHub preset that a model file starts from: the preset's exact
architecture with random weights, saved with ``save_to_preset`` (task, preprocessor and image
converter, as the real preset holds them) and packed as a ``.tar.gz`` for the pretrained stage's
archive path (``model.pretrained`` + ``pretrained_sha256``).

``STANDINS`` maps each preset name to its builder module, which says in its docstring where every
architecture value comes from:

- ``benchmarks.standin_retinanet``: ``retinanet_resnet50_fpn_coco`` (``retinanet_resnet50.yaml``);
- ``benchmarks.standin_resnet``: ``resnet_101_imagenet`` (``faster_rcnn_resnet101.yaml``);
- ``benchmarks.standin_dfine``: ``dfine_small_obj2coco`` and ``dfine_medium_obj2coco``
  (``dfine_small.yaml``, ``dfine_medium.yaml``) and their ``*_coco`` siblings.

A builder module gives ``PRESETS``, ``build(preset)`` (the task, randomly initialised),
``counted(task)`` (the model whose parameters the preset metadata counts), ``facts(task)`` and
``describe(facts)``, and optionally ``conversion_targets(task, port)``: KerasHub's conversion
replayed, ``port(variable, source key)`` for each variable it fills.

Checks, both printed: the counted model's parameter count equals the preset's in the installed
KerasHub's metadata (``keras_hub.models.Backbone.presets``, read from each model's
``*_presets.py``), and, where the builder replays the conversion, every variable is one the
conversion fills, each exactly once (no variable left at random init in the real preset, none
missing from the stand-in).

    python -m benchmarks.standin_preset --preset retinanet_resnet50_fpn_coco --out /tmp/preset
    # writes <out>/<preset>.tar.gz and <out>/info.json
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
from pathlib import Path
from types import ModuleType

from benchmarks import standin_dfine, standin_resnet, standin_retinanet
from detkit.core.fsio import atomic_write_bytes, atomic_write_json
from sample.make_sample import tar_gz

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

STANDINS: dict[str, ModuleType] = {preset: module for module in (standin_retinanet, standin_resnet, standin_dfine)
                                   for preset in module.PRESETS}
DEFAULT_PRESET = "retinanet_resnet50_fpn_coco"


class StandInError(ValueError):
    pass


def preset_name(handle: str) -> str:
    """The preset a model file's ``pretrained`` handle names: ``kaggle://keras/<model>/keras/<preset>/<version>``
    or ``hf://<owner>/<preset>`` (a folder or archive path: its name)."""
    parts = [p for p in handle.split("://", 1)[-1].rstrip("/").split("/") if p]
    if not parts:
        raise StandInError(f"'{handle}' names no preset")
    if handle.startswith("kaggle://") and len(parts) >= 4:
        return parts[3]
    name = parts[-1]
    for suffix in (".tar.gz", ".tgz", ".tar"):
        name = name.removesuffix(suffix)
    return name


def builder(preset: str) -> ModuleType:
    if preset not in STANDINS:
        raise StandInError(f"no stand-in for the preset '{preset}'; stand-ins exist for {', '.join(sorted(STANDINS))}")
    return STANDINS[preset]


def preset_metadata(preset: str) -> dict:
    """The installed KerasHub's metadata of the preset (parameter count, handle)."""
    import keras_hub

    return keras_hub.models.Backbone.presets[preset]


def build(preset: str):
    """The preset's task with random weights, seeded by the preset's parameter count (reproducible)."""
    import keras

    keras.utils.set_random_seed(preset_metadata(preset)["metadata"]["params"])
    return builder(preset).build(preset)


def conversion_check(module: ModuleType, task) -> dict:
    """Replay the builder's conversion on the stand-in: every variable filled, each exactly once."""
    targets: dict[int, str] = {}

    def port(variable, key: str) -> None:
        if id(variable) in targets:
            raise AssertionError(f"{variable.path} is ported twice ({targets[id(variable)]}, {key})")
        targets[id(variable)] = key

    module.conversion_targets(task, port)
    variables = {id(v): v.path for v in task.weights}
    if set(targets) != set(variables):
        missing = sorted(variables[i] for i in set(variables) - set(targets))
        raise AssertionError(f"variables the conversion does not fill: {missing[:5]}; "
                             f"{len(set(targets) - set(variables))} ported variables are not the model's weights")
    return {"variables": len(variables), "source_tensors": len(set(targets.values()))}


def verify(preset: str, task) -> dict:
    """Check the stand-in against the preset's metadata (and the conversion, where replayed); raise on a mismatch."""
    module = builder(preset)
    expected = preset_metadata(preset)["metadata"]["params"]
    counted = module.counted(task)
    parameters = int(counted.count_params())
    if parameters != expected:
        raise AssertionError(f"stand-in {type(counted).__name__} has {parameters:,} parameters, "
                             f"the preset {preset} has {expected:,}")
    checks = {"preset": preset, "task": type(task).__name__, "parameters": int(task.count_params()),
              "counted": type(counted).__name__, "counted_parameters": parameters, "metadata_parameters": expected,
              "facts": module.facts(task)}
    if hasattr(module, "conversion_targets"):
        checks["conversion"] = conversion_check(module, task)
    return checks


def write(preset: str, out: Path) -> dict:
    """Build, verify and save the stand-in; ``<out>/<preset>.tar.gz`` plus what the pretrained stage needs."""
    task = build(preset)
    checks = verify(preset, task)
    with tempfile.TemporaryDirectory() as tmp:
        task.save_to_preset(str(Path(tmp) / preset))
        files = {str(p.relative_to(tmp)): p.read_bytes() for p in sorted(Path(tmp).rglob("*")) if p.is_file()}
    data = tar_gz(files)
    archive = Path(out) / f"{preset}.tar.gz"
    atomic_write_bytes(archive, data)
    return {"archive": str(archive), "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "files": sorted(files), **checks}


def describe(info: dict) -> str:
    """One line: what was built and checked."""
    conversion = info.get("conversion")
    replayed = (f"; layer structure: all {conversion['variables']} variables are exactly the "
                f"{conversion['source_tensors']} source tensors KerasHub's conversion ports, each once (checked)"
                if conversion else "")
    whole = (f" (the saved {info['task']}: {info['parameters']:,})"
             if info["parameters"] != info["counted_parameters"] else "")
    return (f"stand-in {info['preset']}: {info['counted']} {info['counted_parameters']:,} parameters = the installed "
            f"preset metadata's {info['metadata_parameters']:,} (checked){whole}{replayed}; "
            f"{builder(info['preset']).describe(info['facts'])}; random weights; "
            f"{Path(info['archive']).name} {info['size'] / 1e6:.0f} MB")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(STANDINS),
                        help=f"the KerasHub preset to stand in for (default {DEFAULT_PRESET})")
    parser.add_argument("--out", type=Path, required=True, help="folder for the .tar.gz (and info.json)")
    args = parser.parse_args(argv)
    info = write(args.preset, args.out)
    atomic_write_json(args.out / "info.json", info)
    print(describe(info))


if __name__ == "__main__":
    main()
