"""DVC stage ``download``: bring the raw dataset into ``data/raw/``.

Either downloads, verifies and unpacks ``dataset.archives`` (mirrors tried in order), or
copies ``dataset.local_dir``'s regular files for a dataset that is already on disk (links out of
it and special files are named and skipped, never opened: ``detkit.core.tree``). Downloads go through
a cache folder that is not a DVC output, because DVC deletes a stage's outputs before
running it and an interrupted 800 MB download should resume, not start over. Extraction
and the copy stop before they write more than ``dataset.max_extracted_bytes``; the
temporary folder goes on any failure, Ctrl-C and SIGTERM included.

    python -m stages.download --out data/raw --cache data/downloads [--params params.yaml]
"""

from __future__ import annotations

import re
import signal
import sys
from pathlib import Path

from omegaconf import DictConfig, ListConfig

from detkit.config import ConfigError, workspace_root
from detkit.config.cli import command_parser, run_stage
from detkit.core.fsio import atomic_dir
from detkit.core.tree import TooLargeError, copy_regular_files
from detkit.data.archive import ArchiveError, Budget, archive_suffix, fetch, safe_extract


def _check_archives(archives: ListConfig) -> None:
    names: set[str] = set()
    for i, archive in enumerate(archives):
        where = f"dataset.archives[{i}]"
        if not archive.urls:
            raise ConfigError(f"{where}.urls: list at least one URL")
        if not re.fullmatch(r"[0-9a-fA-F]{64}", archive.sha256.strip()):
            raise ConfigError(f"{where}.sha256: '{archive.sha256}' is not a 64-digit hex digest")
        # The name becomes the cache file name, so it must be one plain, unique file name.
        if archive.name in names or archive.name in ("", ".", "..") or "/" in archive.name:
            raise ConfigError(f"{where}.name: '{archive.name}' must be a unique file name")
        names.add(archive.name)


def _copy_local(local_dir: str, out: Path, limit: int) -> dict:
    source = Path(local_dir)
    source = source if source.is_absolute() else workspace_root() / source
    if not source.is_dir():
        raise ConfigError(f"dataset.local_dir: {source} does not exist or is not a folder")
    if out.resolve().is_relative_to(source.resolve()):
        # Copying a folder into itself would recurse without end.
        raise ConfigError(f"dataset.local_dir: {source} contains the output folder {out}")
    with atomic_dir(out) as tmp:
        copied, unread = copy_regular_files(source, tmp, "dataset.local_dir", limit, "dataset.max_extracted_bytes")
        files = sum(1 for path in tmp.rglob("*") if path.is_file())
    for rel, reason in sorted(unread.items()):
        print(f"download: skipped {source / rel}: {reason}")
    print(f"download: copied {files} files ({copied:,} bytes) from {source} to {out}"
          + (f"; {len(unread)} paths skipped" if unread else ""))
    return {"local_dir": str(source), "files": files, "bytes": copied, "skipped": unread, "output": str(out)}


def run(cfg: DictConfig, inputs: dict[str, Path], outputs: dict[str, Path]) -> dict:
    """Fill ``outputs['raw']`` from the dataset's archives or local folder; return a summary.

    ``inputs['cache']`` keeps downloaded archives (and partial downloads) across runs.
    """
    dataset = cfg.dataset
    out = outputs["raw"]
    if dataset.local_dir and dataset.archives:
        raise ConfigError("dataset: set either archives or local_dir, not both")
    if dataset.local_dir:
        return _copy_local(dataset.local_dir, out, dataset.max_extracted_bytes)
    if not dataset.archives:
        raise ConfigError("dataset: neither archives nor local_dir is set; nothing to download")
    _check_archives(dataset.archives)

    cache = inputs["cache"]
    fetched = [
        fetch(
            list(archive.urls),
            cache / f"{archive.name}{archive_suffix(archive.urls[0])}",
            archive.size,
            archive.sha256,
            label=archive.name,
        )
        for archive in dataset.archives
    ]
    # All archives land in one staged folder, so the output appears whole or not at all.
    budget = Budget(dataset.max_extracted_bytes, "dataset.max_extracted_bytes")
    with atomic_dir(out) as tmp:
        extracted = [safe_extract(got.path, tmp, budget) for got in fetched]

    summary = {
        "archives": [
            {
                "name": archive.name,
                "url": got.url,
                "reused": got.reused,
                "bytes": got.size,
                "sha256": got.sha256,
                "members": len(done.members),
                "extracted_bytes": done.disk_bytes,
            }
            for archive, got, done in zip(dataset.archives, fetched, extracted, strict=True)
        ],
        "output": str(out),
    }
    for item in summary["archives"]:
        source = "cache" if item["reused"] else item["url"]
        print(
            f"download: {item['name']}: {item['bytes']:,} bytes from {source}, "
            f"sha256 {item['sha256'][:12]}..., {item['members']:,} members extracted "
            f"({item['extracted_bytes']:,} bytes in 4 KiB blocks)"
        )
    print(f"download: wrote {out}")
    return summary


def _terminated(signum: int, frame: object) -> None:
    # SIGTERM's default ends the process where it stands, leaving the extraction's temporary folder
    # (gigabytes, maybe) behind; raised as an exception, it unwinds through atomic_dir, which removes it.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminated)
    parser = command_parser("stages.download", __doc__)
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--cache", type=Path, required=True, help="download cache folder (kept across runs)")
    root = workspace_root()
    return run_stage(parser, argv, lambda cfg, args: run(cfg, {"cache": root / args.cache}, {"raw": root / args.out}),
                     errors=(ArchiveError, TooLargeError))


if __name__ == "__main__":
    sys.exit(main())
