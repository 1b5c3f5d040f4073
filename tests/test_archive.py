"""detkit.data.archive on its own, from servers on 127.0.0.1: each failed mirror named with what went wrong,
what the console says, a kept part that is wrong thrown away, a complete one not fetched again, a file
longer than promised cut short, a server that sends other bytes than asked for, the progress bar on a
terminal; archive suffixes; extraction charged in whole blocks; every unsafe member named with why.
(test_download holds the download stage built on it.)"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import os
import pty
import re
import struct
import tarfile
import termios

import pytest

from detkit.data.archive import (
    CHUNK,
    DISK_BLOCK,
    DownloadError,
    UnsafeArchiveError,
    archive_suffix,
    disk_bytes,
    fetch,
    safe_extract,
)
from harness.httpserver import FileServer, Request, dead_url, free_port

DATA = bytes(range(256)) * 400  # 102,400 bytes: a whole chunk and part of another
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def served(tmp_path):
    (tmp_path / "srv").mkdir()
    (tmp_path / "srv" / "a.bin").write_bytes(DATA)
    (tmp_path / "srv" / "other.bin").write_bytes(DATA[::-1])
    (tmp_path / "srv" / "big.bin").write_bytes(DATA * 2)
    return tmp_path / "srv"


def test_each_failed_mirror_is_named_with_what_went_wrong(tmp_path, served, capsys):
    dest = tmp_path / "cache" / "a.bin"
    with FileServer(served, cut_first_after=CHUNK + 100) as cut, FileServer(served, stall_first=1.0) as slow:
        urls = [cut.url("a.bin"), dead_url(), f"https://127.0.0.1:{free_port()}/a.bin", cut.url("missing.bin"),
                slow.url("a.bin"), "ftp://example.com/a.bin", str(tmp_path / "nowhere.bin"), cut.url("other.bin")]
        with pytest.raises(DownloadError) as err:
            fetch(urls, dest, len(DATA), SHA, timeout=(1.0, 0.2))
        other = cut.requests[-2:]
    kept = f"({CHUNK} bytes kept to resume)"  # the first chunk arrived before the connection broke
    lines = str(err.value).splitlines()
    assert lines[0] == "a.bin: could not fetch a verified copy from any mirror:"
    assert re.fullmatch(rf"  - {re.escape(urls[0])}: connection broken: IncompleteRead\(.*\) {re.escape(kept)}",
                        lines[1]), lines[1]
    assert lines[2:] == [
        f"  - {urls[1]}: cannot connect: [Errno 111] Connection refused {kept}",
        f"  - {urls[2]}: cannot connect: [Errno 111] Connection refused {kept}",
        f"  - {urls[3]}: HTTP 404 Not Found {kept}",
        f"  - {urls[4]}: timed out {kept}",
        f"  - {urls[5]}: unsupported URL scheme 'ftp' (use http, https, file)",
        f"  - {urls[6]}: [Errno 2] No such file or directory: '{urls[6]}'",
        # Resumed on the kept part, then, as that may be what is wrong, fetched whole: another file.
        f"  - {urls[7]}: sha256 mismatch: got {hashlib.sha256(DATA[::-1]).hexdigest()}, expected {SHA}"]
    assert [(r.range, r.status) for r in other] == [(f"bytes={CHUNK}-", 206), (None, 200)]
    assert capsys.readouterr().out.splitlines() == [
        f"a.bin: downloading {urls[0]}", *(f"a.bin: resuming at byte {CHUNK} {url}" for url in urls[1:5]),
        f"a.bin: copying {urls[6]}", f"a.bin: resuming at byte {CHUNK} {urls[7]}", f"a.bin: downloading {urls[7]}"]
    assert sorted(p.name for p in dest.parent.iterdir()) == []  # nothing half-right is kept


def test_a_kept_part_that_is_wrong_is_fetched_again_whole(tmp_path, served, capsys):
    dest = tmp_path / "a.bin"
    dest.with_name("a.bin.part").write_bytes(b"x" * 1000)  # an older file's start
    with FileServer(served) as server:
        got = fetch([server.url("a.bin")], dest, len(DATA), SHA)
    assert (got.path, got.url, got.size, got.sha256, got.reused) == (dest, server.url("a.bin"), len(DATA), SHA,
                                                                      False)
    assert dest.read_bytes() == DATA and not dest.with_name("a.bin.part").exists()
    assert [(r.range, r.status) for r in server.requests] == [("bytes=1000-", 206), (None, 200)]
    assert "a.bin: resuming at byte 1000" in capsys.readouterr().out


def test_a_complete_part_is_checked_without_fetching_it_again(tmp_path, served):
    part = tmp_path / "a.bin.part"
    with FileServer(served) as server:
        part.write_bytes(DATA)  # a crash between the last byte and the rename
        fetch([server.url("a.bin")], tmp_path / "a.bin", len(DATA), SHA)
        assert server.requests == []
        part.write_bytes(DATA)  # and without a size to compare: the server says there is nothing left
        (tmp_path / "a.bin").unlink()
        fetch([server.url("a.bin")], tmp_path / "a.bin", None, SHA)
        assert server.requests == [Request("/a.bin", f"bytes={len(DATA)}-", 416, 0)]
    assert (tmp_path / "a.bin").read_bytes() == DATA


def test_a_file_longer_than_promised_is_cut_short(tmp_path, served):
    with FileServer(served) as server, pytest.raises(DownloadError) as err:
        fetch([server.url("big.bin")], tmp_path / "a.bin", CHUNK, SHA)
    # Reading stops at the first chunk past the size: a wrong file cannot fill the disk.
    assert f"size mismatch: got {2 * CHUNK} bytes, expected {CHUNK}" in str(err.value)
    assert not (tmp_path / "a.bin.part").exists()


@pytest.mark.parametrize("answer, problem", [
    ((206, "bytes 0-{end}/{length}"), "asked for bytes from 1000, server sent range 'bytes 0-102399/102400'"),
    ((206, None), "asked for bytes from 1000, server sent range ''"),
    ((203, "bytes {start}-{end}/{length}"), "unexpected HTTP status 203"),
], ids=["other-range", "no-range", "status-203"])
def test_a_server_that_answers_a_resume_with_other_bytes_is_refused(tmp_path, served, answer, problem):
    (tmp_path / "a.bin.part").write_bytes(DATA[:1000])
    with FileServer(served, range_answer=answer) as server, pytest.raises(DownloadError) as err:
        fetch([server.url("a.bin")], tmp_path / "a.bin", len(DATA), SHA)
    assert f"{server.url('a.bin')}: {problem} (1000 bytes kept to resume)" in str(err.value)


def test_a_download_on_a_terminal_shows_its_progress(tmp_path, served):
    (tmp_path / "a.bin.part").write_bytes(DATA[:CHUNK])
    master, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal 100 columns wide
    with FileServer(served) as server, open(follower, "w") as terminal, contextlib.redirect_stderr(terminal):
        fetch([server.url("a.bin")], tmp_path / "a.bin", len(DATA), SHA)
    os.set_blocking(master, False)
    shown = b""
    with contextlib.suppress(OSError):  # nothing more to read (EAGAIN), or the terminal closed (EIO)
        while chunk := os.read(master, 65536):
            shown += chunk
    os.close(master)
    last = shown.decode().replace("\r\n", "\r").split("\r")[-2]  # the bar as it was left
    assert re.fullmatch(r"a\.bin: 100%\|█+\| 100k/100k \[.*B/s\]", last), last  # resumed at 64k, bytes in KiB


def test_an_archive_suffix_keeps_its_double_suffix():
    assert [archive_suffix(url) for url in ("https://h/data/images.tar.gz?download=1", "data/v1.2/model.tar.bz2",
                                            "file:///a/b.tgz", "x.zip", "x.gz", "images")] == [
        ".tar.gz", ".tar.bz2", ".tgz", ".zip", ".gz", ""]


@pytest.mark.parametrize("size, blocks", [(0, 1), (1, 1), (DISK_BLOCK, 1), (DISK_BLOCK + 1, 2), (5 * DISK_BLOCK, 5)])
def test_extraction_is_charged_in_whole_blocks(size, blocks):
    member = tarfile.TarInfo("a")
    member.size = size
    assert disk_bytes(member) == blocks * DISK_BLOCK


def test_every_unsafe_member_is_named_with_why_and_nothing_is_written(tmp_path):
    def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, link
        return info

    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        tar.addfile(member("images/fine.jpg"), io.BytesIO(b""))
        for info in (member("/etc/cron.d/x"), member("images/../../up.txt"), member("images/link", tarfile.SYMTYPE,
                     "/etc/passwd"), member("images/hard", tarfile.LNKTYPE, "images/fine.jpg"),
                     member("dev/null", tarfile.CHRTYPE), member("dev/sda", tarfile.BLKTYPE),
                     member("images/pipe", tarfile.FIFOTYPE)):
            tar.addfile(info)
    with pytest.raises(UnsafeArchiveError) as err:
        safe_extract(archive, tmp_path / "out")
    assert str(err.value).splitlines() == [
        f"{archive}: refusing to extract unsafe members:",
        "  - '/etc/cron.d/x': absolute path",
        "  - 'images/../../up.txt': path leads outside the destination",
        "  - 'images/link': symlink to '/etc/passwd': links are not extracted",
        "  - 'images/hard': hard link to 'images/fine.jpg': links are not extracted",
        "  - 'dev/null': character device: neither a regular file nor a folder",
        "  ... and 2 more"]
    assert not (tmp_path / "out").exists()
    with tarfile.open(archive, "w") as tar:
        for info in (member("dev/sda", tarfile.BLKTYPE), member("images/pipe", tarfile.FIFOTYPE)):
            tar.addfile(info)
    with pytest.raises(UnsafeArchiveError) as err:
        safe_extract(archive, tmp_path / "out")
    assert str(err.value).splitlines()[1:] == ["  - 'dev/sda': block device: neither a regular file nor a folder",
                                               "  - 'images/pipe': FIFO: neither a regular file nor a folder"]
