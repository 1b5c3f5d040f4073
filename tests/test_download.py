"""The download stage, offline: archives built here, served from 127.0.0.1 or from disk."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf

from detkit.config import ConfigError, cli
from detkit.data.archive import DISK_BLOCK, DownloadError, UnsafeArchiveError, fetch
from stages import download
from stages.download import run
from tests.httpserver import FileServer, dead_url

FILES = {
    "images/Abyssinian_1.jpg": b"\xff\xd8\xff not really a jpeg",
    "annotations/list.txt": b"#Image CLASS-ID SPECIES BREED ID\nAbyssinian_1 1 1 1\n",
    "annotations/xmls/Abyssinian_1.xml": b"<annotation></annotation>\n",
}


def make_tar(path: Path, files: dict[str, bytes], extra: tuple[tarfile.TarInfo, ...] = ()) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info)
    return path


def entry(name: str, urls: list[str], archive: Path, **override: object) -> dict:
    blob = archive.read_bytes()
    return {
        "name": name,
        "urls": urls,
        "size": len(blob),
        "sha256": hashlib.sha256(blob).hexdigest(),
        **override,
    }


def with_archives(cfg: DictConfig, *archives: dict) -> DictConfig:
    return OmegaConf.merge(cfg, {"dataset": {"archives": list(archives), "local_dir": None}})


def dirs(tmp_path: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    return {"cache": tmp_path / "work" / "cache"}, {"raw": tmp_path / "work" / "raw"}


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def tree_member(archive: Path, name: str) -> bytes:
    with tarfile.open(archive) as tar:
        return tar.extractfile(name).read()


def siblings(out: Path) -> list[str]:
    """Leftover staging folders next to the output (``.raw.tmp-*``, ``.raw.old-*``)."""
    if not out.parent.is_dir():
        return []
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def test_http_archive_is_verified_and_extracted_then_reused_from_cache(cfg, tmp_path):
    archive = make_tar(tmp_path / "srv" / "images.tar.gz", FILES)
    inputs, outputs = dirs(tmp_path)
    with FileServer(tmp_path / "srv") as server:
        url = server.url("images.tar.gz")
        cfg = with_archives(cfg, entry("images", [url], archive))
        summary = run(cfg, inputs, outputs)

    assert tree(outputs["raw"]) == FILES
    assert summary["archives"] == [
        {
            "name": "images",
            "url": url,
            "reused": False,
            "bytes": archive.stat().st_size,
            "sha256": hashlib.sha256(archive.read_bytes()).hexdigest(),
            "members": len(FILES),
            "extracted_bytes": len(FILES) * DISK_BLOCK,  # each file under one block
        }
    ]
    assert sorted(p.name for p in inputs["cache"].iterdir()) == ["images.tar.gz"]
    assert siblings(outputs["raw"]) == []

    # The server is gone now: the verified cache file is enough.
    again = run(cfg, inputs, outputs)
    assert again["archives"][0]["reused"] is True
    assert tree(outputs["raw"]) == FILES


@pytest.mark.parametrize(
    "override, problem",
    [({"sha256": "0" * 64}, "sha256 mismatch"), ({"size": 12345}, "size mismatch")],
)
def test_wrong_file_is_refused_and_nothing_is_kept(cfg, tmp_path, override, problem):
    archive = make_tar(tmp_path / "srv" / "images.tar.gz", FILES)
    inputs, outputs = dirs(tmp_path)
    with FileServer(tmp_path / "srv") as server:
        cfg = with_archives(cfg, entry("images", [server.url("images.tar.gz")], archive, **override))
        with pytest.raises(DownloadError) as err:
            run(cfg, inputs, outputs)

    message = str(err.value)
    assert message.startswith("images:")
    assert problem in message and server.url("images.tar.gz") in message
    assert not outputs["raw"].exists()
    assert list(inputs["cache"].iterdir()) == []


def test_interrupted_download_resumes_with_a_range_request(cfg, tmp_path):
    archive = make_tar(tmp_path / "srv" / "images.tar.gz", {"images/big.bin": os.urandom(400_000)})
    whole = archive.stat().st_size
    inputs, outputs = dirs(tmp_path)
    part = inputs["cache"] / "images.tar.gz.part"
    with FileServer(tmp_path / "srv", cut_first_after=200_000) as server:
        cfg = with_archives(cfg, entry("images", [server.url("images.tar.gz")], archive))
        with pytest.raises(DownloadError, match="bytes kept to resume"):
            run(cfg, inputs, outputs)
        kept = part.stat().st_size
        assert 0 < kept < whole
        assert not outputs["raw"].exists()

        run(cfg, inputs, outputs)

    first, second = server.requests
    assert first.range is None and first.sent < whole
    assert second.range == f"bytes={kept}-" and second.status == 206
    assert second.sent == whole - kept < whole
    assert (inputs["cache"] / "images.tar.gz").read_bytes() == archive.read_bytes()
    assert not part.exists()
    assert tree(outputs["raw"]) == {"images/big.bin": tree_member(archive, "images/big.bin")}


def test_server_without_range_support_restarts_the_download(cfg, tmp_path):
    archive = make_tar(tmp_path / "srv" / "images.tar.gz", {"images/big.bin": os.urandom(400_000)})
    inputs, outputs = dirs(tmp_path)
    with FileServer(tmp_path / "srv", cut_first_after=200_000, ignore_range=True) as server:
        cfg = with_archives(cfg, entry("images", [server.url("images.tar.gz")], archive))
        with pytest.raises(DownloadError):
            run(cfg, inputs, outputs)
        run(cfg, inputs, outputs)

    assert server.requests[1].range is not None and server.requests[1].status == 200
    assert (inputs["cache"] / "images.tar.gz").read_bytes() == archive.read_bytes()
    assert tree(outputs["raw"])["images/big.bin"] == tree_member(archive, "images/big.bin")


def test_mirrors_that_are_down_are_skipped(cfg, tmp_path):
    archive = make_tar(tmp_path / "srv" / "images.tar.gz", FILES)
    inputs, outputs = dirs(tmp_path)
    with FileServer(tmp_path / "srv") as server:
        good = server.url("images.tar.gz")
        urls = [dead_url(), server.url("missing.tar.gz"), good]
        summary = run(with_archives(cfg, entry("images", urls, archive)), inputs, outputs)
    assert summary["archives"][0]["url"] == good
    assert tree(outputs["raw"]) == FILES


def test_error_lists_every_failed_mirror(cfg, tmp_path):
    archive = make_tar(tmp_path / "srv" / "images.tar.gz", FILES)
    inputs, outputs = dirs(tmp_path)
    with FileServer(tmp_path / "srv") as server:
        urls = [dead_url(), server.url("missing.tar.gz")]
        with pytest.raises(DownloadError) as err:
            run(with_archives(cfg, entry("images", urls, archive)), inputs, outputs)
    message = str(err.value)
    assert all(f"  - {url}: " in message for url in urls)
    assert "404" in message
    assert not outputs["raw"].exists()


def test_read_timeout_moves_on_to_the_next_mirror(tmp_path):
    archive = make_tar(tmp_path / "srv" / "images.tar.gz", FILES)
    blob = archive.read_bytes()
    with FileServer(tmp_path / "srv", stall_first=1.0) as server:
        urls = [server.url("images.tar.gz?mirror=1"), server.url("images.tar.gz?mirror=2")]
        got = fetch(
            urls,
            tmp_path / "cache" / "images.tar.gz",
            len(blob),
            hashlib.sha256(blob).hexdigest(),
            timeout=(1.0, 0.2),
        )
    assert got.url == urls[1]
    assert got.path.read_bytes() == blob


def _member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


HOSTILE = {
    "dot-dot": lambda t: [_member(f"../escape-{t.name}")],
    "absolute": lambda t: [_member(str(t / "absolute-target"))],
    "symlink-absolute": lambda t: [_member("images/passwd", tarfile.SYMTYPE, "/etc/passwd")],
    "symlink-relative": lambda t: [_member("images/up", tarfile.SYMTYPE, "../../escape")],
    "hardlink": lambda t: [_member("images/hard", tarfile.LNKTYPE, "../escape")],
    "device": lambda t: [_member("images/null", tarfile.CHRTYPE)],
    # Each link looks harmless by name; together they point out (the 'data' filter's catch).
    "symlink-chain": lambda t: [
        _member("here", tarfile.SYMTYPE, "."),
        _member("images/out", tarfile.SYMTYPE, "../here/../escape"),
    ],
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archive_is_refused_and_nothing_is_written(cfg, tmp_path, case):
    members = HOSTILE[case](tmp_path)
    archive = make_tar(tmp_path / "srv" / "evil.tar.gz", FILES, tuple(members))
    inputs, outputs = dirs(tmp_path)
    before = set(tmp_path.rglob("*"))

    cfg = with_archives(cfg, entry("evil", [archive.as_uri()], archive))
    with pytest.raises(UnsafeArchiveError) as err:
        run(cfg, inputs, outputs)

    message = str(err.value)
    assert str(inputs["cache"] / "evil.tar.gz") in message
    assert f"'{members[-1].name}'" in message
    assert not outputs["raw"].exists()
    assert siblings(outputs["raw"]) == []
    written = set(tmp_path.rglob("*")) - before
    assert written <= {tmp_path / "work", inputs["cache"], inputs["cache"] / "evil.tar.gz"}


def test_file_url_and_relative_path_mirrors(cfg, tmp_path, monkeypatch):
    images = make_tar(tmp_path / "srv" / "images.tar.gz", {"images/a.jpg": b"a"})
    notes = make_tar(tmp_path / "srv" / "annotations.tar.gz", {"annotations/list.txt": b"x"})
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))  # relative mirrors are repo-root relative
    cfg = with_archives(
        cfg,
        entry("images", [images.as_uri()], images),
        entry("annotations", ["srv/annotations.tar.gz"], notes),
    )
    inputs, outputs = dirs(tmp_path)
    summary = run(cfg, inputs, outputs)
    assert tree(outputs["raw"]) == {"images/a.jpg": b"a", "annotations/list.txt": b"x"}
    assert [a["url"] for a in summary["archives"]] == [images.as_uri(), "srv/annotations.tar.gz"]


def test_previous_output_survives_failed_runs_and_is_replaced_by_a_good_one(cfg, tmp_path):
    inputs, outputs = dirs(tmp_path)
    out = outputs["raw"]
    (out / "images").mkdir(parents=True)
    (out / "images" / "old.jpg").write_bytes(b"old")
    good = make_tar(tmp_path / "srv" / "images.tar.gz", FILES)
    evil = make_tar(tmp_path / "srv" / "evil.tar.gz", FILES, (_member("../x"),))

    bad_checksum = entry("images", [good.as_uri()], good, sha256="f" * 64)
    with pytest.raises(DownloadError):
        run(with_archives(cfg, bad_checksum), inputs, outputs)
    with pytest.raises(UnsafeArchiveError):
        run(with_archives(cfg, entry("evil", [evil.as_uri()], evil)), inputs, outputs)
    assert tree(out) == {"images/old.jpg": b"old"}

    run(with_archives(cfg, entry("images", [good.as_uri()], good)), inputs, outputs)
    assert tree(out) == FILES
    assert siblings(out) == []


def test_local_dir_is_copied(cfg, tmp_path):
    source = tmp_path / "mydata"
    for name, data in FILES.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(data)
    cfg = OmegaConf.merge(cfg, {"dataset": {"archives": [], "local_dir": str(source)}})
    inputs, outputs = dirs(tmp_path)
    summary = run(cfg, inputs, outputs)
    assert tree(outputs["raw"]) == FILES
    assert summary["files"] == len(FILES)


def test_missing_local_dir_is_named(cfg, tmp_path):
    missing = tmp_path / "nowhere"
    cfg = OmegaConf.merge(cfg, {"dataset": {"archives": [], "local_dir": str(missing)}})
    inputs, outputs = dirs(tmp_path)
    with pytest.raises(ConfigError, match=f"dataset.local_dir: {missing}"):
        run(cfg, inputs, outputs)
    assert not outputs["raw"].exists()


def test_malformed_sha256_is_a_config_error(cfg, tmp_path):
    cfg = with_archives(cfg, {"name": "images", "urls": ["x.tar.gz"], "size": None, "sha256": "abc"})
    with pytest.raises(ConfigError, match=r"dataset\.archives\[0\]\.sha256"):
        run(cfg, *dirs(tmp_path))


def test_main_reports_errors_on_stderr(cfg, tmp_path, monkeypatch, capsys):
    archive = make_tar(tmp_path / "srv" / "images.tar.gz", FILES)
    inputs, outputs = dirs(tmp_path)
    args = ["--out", str(outputs["raw"]), "--cache", str(inputs["cache"])]
    assert download.main(["--params", "no-such-params.yaml", *args]) == 2
    assert "no-such-params.yaml: params file not found" in capsys.readouterr().err

    down = with_archives(cfg, entry("images", [dead_url()], archive))
    monkeypatch.setattr(cli, "load_config", lambda params, overrides=(): down)
    assert download.main(args) == 2
    assert capsys.readouterr().err.startswith("error: images: could not fetch")

    up = with_archives(cfg, entry("images", [archive.as_uri()], archive))
    monkeypatch.setattr(cli, "load_config", lambda params, overrides=(): up)
    assert download.main(args) == 0
    assert tree(outputs["raw"]) == FILES
