"""DVC stage ``package``: the newest export as a container build context and a SageMaker
model archive.

Writes

- ``<context>/`` (``build/serving``): a complete ``docker build`` context: the Dockerfile,
  nginx config, entrypoint scripts (all from ``serving/``) and the model in TF Serving's
  layout under ``model/<model_name>/<version>/``, plus ``package.json`` (what was packed);
- ``<archive>`` (``build/model.tar.gz``): SageMaker's model-data layout,
  ``<model_name>/<version>/saved_model.pb`` + ``variables/`` (+ ``assets.extra/``), so the
  same model also runs on AWS's prebuilt TensorFlow Serving inference images, and
  ``code/inference.py`` (``serving/inference.py``), the handler those images load so that they
  take raw image bodies as this project's container does.

Both are reproducible: same export, same bytes (sorted members, fixed times and owners).

    python -m stages.package --export models/export --serving serving \
        --context build/serving --archive build/model.tar.gz
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import sys
import tarfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from detkit.config.cli import command_parser, run_stage
from detkit.core import fsio
from detkit.core.fsio import atomic_dir, atomic_write_bytes

# What the Dockerfile copies from the context besides the model: package fails without them.
SERVING_FILES = ("Dockerfile", "nginx.conf.template", "invocations.js", "render-nginx-conf.sh", "entrypoint.sh")
# In model.tar.gz as code/inference.py, where AWS's TF Serving images look for a request handler.
HANDLER = "inference.py"
MODEL_DIR = "model"  # in the context: model/<model_name>/<version>/ (the Dockerfile's COPY source)
MANIFEST = "package.json"


class PackageError(ValueError):
    """Nothing to package, or the export/serving files are incomplete."""


def newest_version(model_dir: Path) -> Path:
    version = fsio.newest_version(model_dir)
    if version is None:
        raise PackageError(f"{model_dir}: no exported version; run the export stage first")
    if not (version / "saved_model.pb").is_file():
        raise PackageError(f"{version}: no saved_model.pb: not a complete export")
    return version


def model_archive(version: Path, model_name: str, handler: Path) -> bytes:
    """``<model_name>/<version>/...`` and ``code/inference.py`` (``handler``) as a gzipped tar,
    byte-identical for identical files."""
    members = [(path, f"{model_name}/{path.relative_to(version.parent)}")
               for path in [version, *sorted(version.rglob("*"))]]
    members += [(handler.parent, "code"), (handler, f"code/{HANDLER}")]
    buffer = io.BytesIO()
    # mtime=0 in the gzip header and every tar header: the archive depends on content only.
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for path, name in members:
            info = tar.gettarinfo(str(path), arcname=name)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            info.mode = 0o755 if path.is_dir() else 0o644
            if path.is_file():
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    return buffer.getvalue()


def run(cfg: DictConfig, inputs: dict[str, Path], outputs: dict[str, Path]) -> dict[str, Any]:
    """Package the newest version of ``inputs['export']/<model_name>`` with ``inputs['serving']``."""
    model_name = cfg.export.model_name
    version = newest_version(Path(inputs["export"]) / model_name)
    serving = Path(inputs["serving"])
    missing = [name for name in (*SERVING_FILES, HANDLER) if not (serving / name).is_file()]
    if missing:
        raise PackageError(f"{serving}: missing {', '.join(missing)} (the Dockerfile and model.tar.gz need them)")
    check_file = version / fsio.EXPORT_CHECK
    check = json.loads(check_file.read_text()) if check_file.is_file() else {"passed": False}
    archive = model_archive(version, model_name, serving / HANDLER)
    manifest = {
        "model_name": model_name,
        "version": int(version.name),
        "export": str(version),
        "export_check_passed": bool(check.get("passed")),
        "model_tar_gz_sha256": hashlib.sha256(archive).hexdigest(),
    }
    with atomic_dir(Path(outputs["context"])) as tmp:
        for name in SERVING_FILES:
            shutil.copy2(serving / name, tmp / name)
        shutil.copytree(version, tmp / MODEL_DIR / model_name / version.name)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    atomic_write_bytes(Path(outputs["archive"]), archive)
    print(f"package: {outputs['context']} (docker build context) and {outputs['archive']} "
          f"({len(archive) / 1e6:.1f} MB): {model_name} version {version.name}, export check "
          f"{'passed' if manifest['export_check_passed'] else 'FAILED'}")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("stages.package", __doc__)
    parser.add_argument("--export", type=Path, required=True, help="export stage output (<export>/<model_name>/)")
    parser.add_argument("--serving", type=Path, required=True,
                        help="serving/ (Dockerfile, nginx config, scripts, inference.py)")
    parser.add_argument("--context", type=Path, required=True, help="docker build context to write")
    parser.add_argument("--archive", type=Path, required=True, help="model.tar.gz to write")
    return run_stage(parser, argv, lambda cfg, args: run(cfg, {"export": args.export, "serving": args.serving},
                                                         {"context": args.context, "archive": args.archive}),
                     errors=(PackageError,))


if __name__ == "__main__":
    sys.exit(main())
