"""The download stage, offline: archives built here, served from 127.0.0.1 or from disk."""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf

from detkit.config import ConfigError, cli
from detkit.core.tree import TooLargeError
from detkit.data.archive import DISK_BLOCK, ArchiveTooLargeError, DownloadError, UnsafeArchiveError, fetch
from harness.httpserver import FileServer, dead_url
from stages import download
from stages.download import run
from tests.conftest import REPO_ROOT

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


def test_local_dir_copies_only_its_regular_files_and_names_every_other_path(cfg, tmp_path, capsys):
    source = tmp_path / "mydata"
    for name, data in FILES.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(data)
    outside = tmp_path / "secret.txt"
    outside.write_bytes(b"not yours")
    os.mkfifo(tmp_path / "outside-fifo")  # were it followed and opened, the stage would block for ever
    os.mkfifo(source / "images" / "pipe")
    (source / "loop").symlink_to("loop")
    (source / "gone").symlink_to("nowhere.jpg")
    (source / "escape.txt").symlink_to(outside)
    (source / "escape-fifo").symlink_to(tmp_path / "outside-fifo")
    (source / "alias.jpg").symlink_to(source / next(iter(FILES)))  # a link to a file inside: copied
    cfg = OmegaConf.merge(cfg, {"dataset": {"archives": [], "local_dir": str(source)}})
    inputs, outputs = dirs(tmp_path)
    summary = run(cfg, inputs, outputs)
    assert tree(outputs["raw"]) == {**FILES, "alias.jpg": FILES[next(iter(FILES))]}
    assert summary["skipped"] == {
        "escape-fifo": f"link to '{tmp_path / 'outside-fifo'}', outside dataset.local_dir: not followed",
        "escape.txt": f"link to '{outside}', outside dataset.local_dir: not followed",
        "gone": "dangling link: 'nowhere.jpg' does not exist",
        "images/pipe": "a FIFO (named pipe): not read",
        "loop": "link loop: 'loop' leads back to a link on its way"}
    printed = capsys.readouterr().out
    assert f"download: skipped {source / 'images' / 'pipe'}: a FIFO (named pipe): not read" in printed
    assert "5 paths skipped" in printed


def test_local_dir_past_the_limit_is_refused_and_nothing_is_kept(cfg, tmp_path):
    source = tmp_path / "mydata"
    source.mkdir()
    (source / "a.bin").write_bytes(b"a" * 600)
    (source / "b.bin").write_bytes(b"b" * 600)
    cfg = OmegaConf.merge(cfg, {"dataset": {"archives": [], "local_dir": str(source), "max_extracted_bytes": 1000}})
    inputs, outputs = dirs(tmp_path)
    refusal = (rf"{source / 'b.bin'}: refusing it \(600 bytes\): with it dataset.local_dir would copy 1,200 bytes, "
               r"more than dataset.max_extracted_bytes = 1,000")
    with pytest.raises(TooLargeError, match=refusal):
        run(cfg, inputs, outputs)
    assert not outputs["raw"].exists() and siblings(outputs["raw"]) == []


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


# ---------------------------------------------------------------- archives bounded before they cost disk

GIB = 1 << 30
ZEROS = 16 << 20  # one gzip member of this many zeros is repeated to make any size of them


@functools.cache
def gzipped_zeros(count: int = ZEROS) -> bytes:
    return gzip.compress(bytes(count), compresslevel=9, mtime=0)


def lazy_tar_gz(path: Path, parts: list[bytes | int]) -> Path:
    """A .tar.gz of ``parts`` (tar bytes, or a count of zero bytes) never held or written expanded.

    It is a sequence of gzip members, which gzip and tarfile read as one stream (as ``cat a.gz b.gz``
    makes); the zeros are one compressed block of 16 MiB written over and over, so a member of 20 GiB
    of zeros takes 20 MB.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as out:
        for part in parts:
            if isinstance(part, bytes):
                out.write(gzip.compress(part, mtime=0))
                continue
            whole, rest = divmod(part, ZEROS)
            for _ in range(whole):
                out.write(gzipped_zeros())
            if rest:
                out.write(gzip.compress(bytes(rest), mtime=0))
    return path


def header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    return info.tobuf(tarfile.PAX_FORMAT)


def padded(size: int) -> int:
    """A member's data with its padding to whole tar blocks."""
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


END = 2 * tarfile.BLOCKSIZE  # two zero blocks end a tar archive


def left_on_disk(tmp_path: Path, before: set[Path]) -> set[str]:
    return {p.relative_to(tmp_path).as_posix() for p in set(tmp_path.rglob("*")) - before}


@pytest.mark.parametrize("complete", [True, False], ids=["whole-bomb", "cut-after-16MiB"])
def test_a_member_past_the_limit_is_refused_at_its_header(cfg, tmp_path, complete):
    # The reported case: about 20 MB of archive holding one member of 20 GiB (extracted until stopped
    # at 2.3 GB). Cut short after 16 MiB of the member, the archive proves that the refusal reads none
    # of the member's data: reading on would fail with 'unexpected end of data' instead.
    size = 20 * GIB
    archive = lazy_tar_gz(tmp_path / "srv" / "bomb.tar.gz",
                          [header("images/Abyssinian_1.jpg", size), padded(size) + END if complete else ZEROS])
    assert archive.stat().st_size < (25 << 20 if complete else 1 << 20)
    inputs, outputs = dirs(tmp_path)
    before = set(tmp_path.rglob("*"))

    with pytest.raises(ArchiveTooLargeError) as err:
        run(with_archives(cfg, entry("bomb", [archive.as_uri()], archive)), inputs, outputs)

    message = str(err.value)
    assert f"'images/Abyssinian_1.jpg' ({size:,} bytes)" in message
    assert f"dataset.max_extracted_bytes = {cfg.dataset.max_extracted_bytes:,}" in message
    assert left_on_disk(tmp_path, before) == {"work", "work/cache", "work/cache/bomb.tar.gz"}


def sparse_pax(name: str, apparent: int) -> bytes:
    """A GNU sparse member, format 1.0 (GNU tar --sparse --format=posix): a map of one 512-byte
    block at the end of ``apparent`` bytes of holes."""
    info = tarfile.TarInfo(f"{os.path.dirname(name)}/GNUSparseFile.0/{os.path.basename(name)}")
    sparse_map = f"1\n{apparent - 512}\n512\n".encode().ljust(512, b"\0")
    info.size = len(sparse_map) + 512
    info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": name,
                        "GNU.sparse.realsize": str(apparent)}
    return info.tobuf(tarfile.PAX_FORMAT) + sparse_map + b"x" * 512


def sparse_gnu(name: str, apparent: int) -> bytes:
    """The old GNU sparse member (type 'S', GNU tar --sparse --format=gnu): the map in the header."""
    info = tarfile.TarInfo(name)
    info.type = tarfile.GNUTYPE_SPARSE
    info.size = 512
    buf = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    # The old GNU header: four (offset, numbytes) pairs from byte 386, the real size at byte 483.
    buf[386:398] = tarfile.itn(apparent - 512, 12, tarfile.GNU_FORMAT)
    buf[398:410] = tarfile.itn(512, 12, tarfile.GNU_FORMAT)
    buf[483:495] = tarfile.itn(apparent, 12, tarfile.GNU_FORMAT)
    buf[148:156] = b" " * 8
    buf[148:155] = b"%06o\0" % tarfile.calc_chksums(bytes(buf))[0]
    return bytes(buf) + b"x" * 512


@pytest.mark.parametrize("craft", [sparse_pax, sparse_gnu], ids=["pax-1.0", "gnu-old"])
def test_a_sparse_member_is_refused_before_anything_is_written(cfg, tmp_path, craft):
    # The reported case: under 1 KB of archive holding a sparse member of 20 GiB apparent size, which
    # tarfile's 'data' filter extracts (taking 4 KiB) and DVC then copied into its cache as 20 GB.
    name = "images/Abyssinian_1.jpg"
    archive = lazy_tar_gz(tmp_path / "srv" / "sparse.tar.gz", [craft(name, 20 * GIB) + bytes(END)])
    assert archive.stat().st_size < 1024
    with tarfile.open(archive) as tar:  # what tarfile reports, which the check relies on
        assert [(m.name, m.size, m.issparse()) for m in tar] == [(name, 20 * GIB, True)]
    inputs, outputs = dirs(tmp_path)
    before = set(tmp_path.rglob("*"))

    with pytest.raises(UnsafeArchiveError, match=f"'{name}': sparse file of {20 * GIB:,} bytes apparent size"):
        run(with_archives(cfg, entry("sparse", [archive.as_uri()], archive)), inputs, outputs)
    assert left_on_disk(tmp_path, before) == {"work", "work/cache", "work/cache/sparse.tar.gz"}


def test_the_limit_counts_every_archive_and_a_block_for_each_member(cfg, tmp_path):
    # Empty files take no bytes but an inode and a block each: countless of them are bounded too.
    first = make_tar(tmp_path / "srv" / "first.tar.gz", {f"images/{i}.jpg": b"" for i in range(3)})
    second = make_tar(tmp_path / "srv" / "second.tar.gz", {f"annotations/{i}.xml": b"" for i in range(3)})
    archives = [entry("first", [first.as_uri()], first), entry("second", [second.as_uri()], second)]
    inputs, outputs = dirs(tmp_path)
    before = set(tmp_path.rglob("*"))

    over = OmegaConf.merge(with_archives(cfg, *archives), {"dataset": {"max_extracted_bytes": 6 * DISK_BLOCK - 1}})
    with pytest.raises(ArchiveTooLargeError, match="'annotations/2.xml' .* would extract 24,576 bytes"):
        run(over, inputs, outputs)
    assert left_on_disk(tmp_path, before) == {"work", "work/cache", "work/cache/first.tar.gz",
                                              "work/cache/second.tar.gz"}

    exact = OmegaConf.merge(over, {"dataset": {"max_extracted_bytes": 6 * DISK_BLOCK}})
    summary = run(exact, inputs, outputs)
    assert [a["extracted_bytes"] for a in summary["archives"]] == [3 * DISK_BLOCK, 3 * DISK_BLOCK]
    assert len(tree(outputs["raw"])) == 6


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_an_interrupted_extraction_leaves_only_the_download_cache(tmp_path, sig):
    # The first archive lands in the staging folder; the stage is stopped while it reads the second
    # (1 GiB of zeros: seconds of work left), and the staging folder with the first must go.
    first = make_tar(tmp_path / "srv" / "first.tar.gz", {"images/first.jpg": b"first"})
    second = lazy_tar_gz(tmp_path / "srv" / "second.tar.gz", [header("images/big.bin", GIB), padded(GIB) + END])
    archives = ",".join(
        f"{{name:{e['name']},urls:['{e['urls'][0]}'],size:{e['size']},sha256:'{e['sha256']}'}}"
        for e in (entry("first", [first.as_uri()], first), entry("second", [second.as_uri()], second)))
    inputs, outputs = dirs(tmp_path)
    before = set(tmp_path.rglob("*"))
    command = [sys.executable, "-m", "stages.download", "--out", str(outputs["raw"]), "--cache", str(inputs["cache"]),
               "dataset=sample", f"dataset.archives=[{archives}]", f"dataset.max_extracted_bytes={4 * GIB}"]
    # Ctrl-C in a terminal reaches a stage whose SIGINT is at its default. A parent that ignores SIGINT (a
    # shell's background job, mutmut's workers) passes that on; one that catches it does not (exec resets it).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        stage = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    finally:
        signal.signal(signal.SIGINT, previous)
    with stage:
        deadline = time.monotonic() + 120
        while not list(outputs["raw"].parent.glob(".raw.tmp-*/images/first.jpg")):
            assert stage.poll() is None, stage.stdout.read().decode()
            assert time.monotonic() < deadline, "the first archive was never extracted"
            time.sleep(0.01)
        stage.send_signal(sig)
        output = stage.communicate(timeout=60)[0].decode()

    assert stage.returncode == (128 + sig if sig == signal.SIGTERM else -sig), output
    assert left_on_disk(tmp_path, before) == {"work", "work/cache", "work/cache/first.tar.gz",
                                              "work/cache/second.tar.gz"}, output
