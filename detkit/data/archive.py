"""Fetch checksum-verified archives from mirrors and unpack them safely.

Shared by the stages that bring data from outside (``download``, ``pretrained``):

- ``fetch`` downloads one file from a list of mirrors into a cache, resuming an
  interrupted download with an HTTP Range request, and verifies its size and sha256.
- ``safe_extract`` unpacks a tar archive of folders and regular files, refusing members that
  would land outside the destination, any other kind of member (links, devices, FIFOs, sparse
  files) and, given a ``Budget``, members that would take the extracted bytes past it. Extract
  into ``detkit.core.fsio.atomic_dir`` so that a refused, broken or interrupted extraction
  leaves no partial output.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import tarfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse
from urllib.request import url2pathname

import requests
from tqdm import tqdm
from urllib3.exceptions import ProtocolError

from detkit.config import workspace_root

# (connect, read) seconds: a read timeout bounds the silence between two chunks, not
# the whole transfer, so large files on slow links still finish.
TIMEOUT = (10.0, 60.0)
# Small enough that a dropped connection loses little of what it had sent.
CHUNK = 1 << 16
# Unsafe members named in one error; a hostile archive may hold thousands.
MAX_LISTED = 5
# Extracted bytes are counted in blocks of the usual file-system size (ext4, XFS, APFS: 4 KiB).
DISK_BLOCK = 4096


class ArchiveError(RuntimeError):
    """A download, verification or extraction failed; the message names what and why."""


class DownloadError(ArchiveError):
    pass


class UnsafeArchiveError(ArchiveError):
    pass


class ArchiveTooLargeError(ArchiveError):
    pass


class _Mismatch(Exception):
    """The bytes arrived but are not the file the config describes."""


@dataclass(frozen=True)
class Fetched:
    path: Path
    url: str  # the mirror the bytes came from, or the cache file when reused
    size: int
    sha256: str
    reused: bool


def archive_suffix(url: str) -> str:
    """The file-type suffix of a URL or path, keeping double ones: '.tar.gz', '.tgz'."""
    suffixes = PurePosixPath(urlparse(url).path).suffixes
    if len(suffixes) >= 2 and suffixes[-2] == ".tar":
        return "".join(suffixes[-2:])
    return suffixes[-1] if suffixes else ""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(
    urls: Sequence[str],
    dest: Path,
    size: int | None,
    sha256: str,
    *,
    timeout: tuple[float, float] = TIMEOUT,
    label: str | None = None,
) -> Fetched:
    """Make ``dest`` a verified copy of the file that ``urls`` (mirrors) all serve.

    Bytes arrive in ``<dest>.part``, which survives failures so that the next call
    resumes it; ``dest`` itself only ever appears complete and verified. Each URL may be
    http(s)://, file:// or a local path (relative to the repository root).
    """
    label = label or dest.name
    want = sha256.strip().lower()
    if dest.is_file():
        problem = _verify(dest.stat().st_size, sha256_file(dest), size, want)
        if problem is None:
            return Fetched(dest, str(dest), dest.stat().st_size, want, reused=True)
        print(f"{label}: cached {dest} is damaged ({problem}); fetching it again")
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    failures = []
    for url in urls:
        try:
            nbytes = _fetch_from(url, part, size, want, timeout, label)
        except _Mismatch as exc:
            failures.append(f"{url}: {exc}")
        except (requests.RequestException, OSError, DownloadError) as exc:
            kept = part.stat().st_size if part.is_file() else 0
            resume = f" ({kept} bytes kept to resume)" if kept and _is_http(url) else ""
            failures.append(f"{url}: {_reason(exc)}{resume}")
        else:
            os.replace(part, dest)
            return Fetched(dest, url, nbytes, want, reused=False)
    listed = "\n".join(f"  - {failure}" for failure in failures) or "  (no mirrors listed)"
    raise DownloadError(f"{label}: could not fetch a verified copy from any mirror:\n{listed}")


def _reason(exc: Exception) -> str:
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return f"HTTP {exc.response.status_code} {exc.response.reason}"
    if not isinstance(exc, requests.RequestException):
        return str(exc)
    # requests wraps urllib3, which wraps the socket error: the innermost one says what
    # happened without repeating the URL three times. A read timeout mid-body arrives as
    # a ConnectionError, so the whole chain is searched for what kind of failure it was.
    chain: list[BaseException] = [exc]
    while len(chain) < 10 and (inner := chain[-1].__cause__ or chain[-1].__context__):
        chain.append(inner)
    if any(isinstance(e, (TimeoutError, requests.Timeout)) for e in chain):
        return "timed out"
    broken = any(isinstance(e, (requests.exceptions.ChunkedEncodingError, ProtocolError)) for e in chain)
    return f"{'connection broken' if broken else 'cannot connect'}: {chain[-1]}"


def _fetch_from(url: str, part: Path, size: int | None, want: str, timeout: tuple[float, float], label: str) -> int:
    resumed = part.is_file() and part.stat().st_size > 0
    nbytes, digest = _transfer(url, part, size, timeout, label)
    problem = _verify(nbytes, digest, size, want)
    if problem is not None and resumed and _is_http(url):
        # The kept bytes may be what is wrong (another mirror, an older file): start over.
        part.unlink()
        nbytes, digest = _transfer(url, part, size, timeout, label)
        problem = _verify(nbytes, digest, size, want)
    if problem is not None:
        part.unlink(missing_ok=True)
        raise _Mismatch(problem)
    return nbytes


def _verify(nbytes: int, digest: str, size: int | None, want: str) -> str | None:
    if size is not None and nbytes != size:
        return f"size mismatch: got {nbytes} bytes, expected {size}"
    if digest != want:
        return f"sha256 mismatch: got {digest}, expected {want}"
    return None


def _is_http(url: str) -> bool:
    return urlparse(url).scheme in ("http", "https")


def _local_path(url: str) -> Path:
    parsed = urlparse(url)
    if parsed.scheme == "file":
        path = Path(url2pathname(parsed.path))
    elif parsed.scheme == "":
        path = Path(url)
    else:
        raise DownloadError(f"unsupported URL scheme '{parsed.scheme}' (use http, https, file)")
    return path if path.is_absolute() else workspace_root() / path


def _transfer(url: str, part: Path, size: int | None, timeout: tuple[float, float], label: str) -> tuple[int, str]:
    """Bring the bytes of ``url`` into ``part``, resuming over HTTP; return (size, sha256)."""
    if not _is_http(url):
        source = _local_path(url)
        print(f"{label}: copying {source}")
        with open(source, "rb") as fh:
            chunks = iter(lambda: fh.read(CHUNK), b"")
            return _write(chunks, part, 0, size, label)
    offset = part.stat().st_size if part.is_file() else 0
    if offset and size is not None and offset >= size:
        # Complete already (a crash before the rename) or too long: the checksum decides.
        return _write((), part, offset, size, label)
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    print(f"{label}: {f'resuming at byte {offset}' if offset else 'downloading'} {url}")
    with requests.get(url, headers=headers, stream=True, timeout=timeout) as resp:
        if offset and resp.status_code == 416:
            # Nothing left to send: the part may be whole; the checksum decides.
            return _write((), part, offset, size, label)
        resp.raise_for_status()
        if resp.status_code == 200:
            # Servers without Range support resend the whole file: start over.
            offset = 0
        elif resp.status_code == 206:
            content_range = resp.headers.get("Content-Range", "")
            if not content_range.startswith(f"bytes {offset}-"):
                raise DownloadError(f"asked for bytes from {offset}, server sent range '{content_range}'")
        else:
            raise DownloadError(f"unexpected HTTP status {resp.status_code}")
        return _write(resp.iter_content(CHUNK), part, offset, size, label)


def _write(chunks: Iterable[bytes], part: Path, offset: int, size: int | None, label: str) -> tuple[int, str]:
    """Append ``chunks`` to the first ``offset`` bytes of ``part``; return (size, sha256)."""
    digest = hashlib.sha256()
    if offset:
        with open(part, "rb") as fh:
            for chunk in iter(lambda: fh.read(CHUNK), b""):
                digest.update(chunk)
    nbytes = offset
    with (
        open(part, "ab" if offset else "wb") as fh,
        tqdm(
            total=size,
            initial=offset,
            desc=label,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            disable=None,  # no bar in logs and under pytest, only on a terminal
        ) as bar,
    ):
        for chunk in chunks:
            fh.write(chunk)
            digest.update(chunk)
            nbytes += len(chunk)
            bar.update(len(chunk))
            if size is not None and nbytes > size:
                break  # not the file we want: stop before it fills the disk
    return nbytes, digest.hexdigest()


def _inside(root: str, path: str) -> bool:
    return os.path.commonpath([root, path]) == root


def disk_bytes(member: tarfile.TarInfo) -> int:
    """What extracting ``member`` costs the disk: its size in whole blocks, at least one (folders and
    empty files take an inode and a block too, so countless empty members are bounded as well)."""
    return max(1, -(-member.size // DISK_BLOCK)) * DISK_BLOCK


def _unsafe_reason(member: tarfile.TarInfo, root: str) -> str | None:
    name = member.name
    # Tar member names are POSIX paths whatever the platform.
    if name.startswith("/"):
        return "absolute path"
    if not _inside(root, os.path.normpath(os.path.join(root, name))):
        return "path leads outside the destination"
    if member.issparse():
        # tarfile would recreate the holes: a file of any apparent size from a few bytes, which DVC
        # then copies byte for byte into its cache.
        return f"sparse file of {member.size:,} bytes apparent size"
    if member.isreg() or member.isdir():
        return None
    if member.issym() or member.islnk():
        return f"{'symlink' if member.issym() else 'hard link'} to '{member.linkname}': links are not extracted"
    kinds = {tarfile.CHRTYPE: "character device", tarfile.BLKTYPE: "block device", tarfile.FIFOTYPE: "FIFO"}
    return f"{kinds.get(member.type, f'member of type {member.type!r}')}: neither a regular file nor a folder"


@dataclass
class Budget:
    """The bytes (``disk_bytes``) that extraction may write, shared by the archives of one output."""

    limit: int
    key: str  # the config key that sets the limit, named when it is reached
    used: int = 0


def _charge(archive: Path, member: tarfile.TarInfo, total: int, budget: Budget | None) -> int:
    """``total`` plus ``member``'s cost; refused past the budget, before any of its data is read."""
    total += disk_bytes(member)
    if budget is not None and total > budget.limit:
        raise ArchiveTooLargeError(
            f"{archive}: refusing '{member.name}' ({member.size:,} bytes): with it the archives would "
            f"extract {total:,} bytes (counted in {DISK_BLOCK}-byte blocks), more than {budget.key} = "
            f"{budget.limit:,}; nothing was kept")
    return total


@dataclass(frozen=True)
class Extracted:
    members: list[str]
    disk_bytes: int  # what the members cost, as Budget counts it


def _refuse_unsafe(archive: Path, unsafe: list[tuple[str, str]]) -> None:
    if not unsafe:
        return
    listed = "\n".join(f"  - '{name}': {reason}" for name, reason in unsafe[:MAX_LISTED])
    if len(unsafe) > MAX_LISTED:
        listed += f"\n  ... and {len(unsafe) - MAX_LISTED} more"
    raise UnsafeArchiveError(f"{archive}: refusing to extract unsafe members:\n{listed}")


def safe_extract(archive: Path, dest_dir: Path, budget: Budget | None = None) -> Extracted:
    """Unpack the tar ``archive`` into ``dest_dir`` (folders and regular files only).

    A first pass reads every header, and refuses the whole archive before anything is written if one
    member would land outside ``dest_dir`` (absolute paths, which tarfile's 'data' filter would
    silently make relative, ``..`` escapes), is no regular file or folder (links, devices, FIFOs,
    sparse files), or would take the extracted bytes past ``budget``: that last check stops at the
    member's header, so a bomb costs neither disk nor the time to decompress it. The second pass
    extracts through a filter that repeats these checks (the file could change in between) and then
    applies the 'data' filter. Should extraction fail or be interrupted anyway, ``dest_dir`` may hold
    part of the archive: extract into a ``detkit.core.fsio.atomic_dir`` so that it is thrown away.
    """
    root = os.path.realpath(dest_dir)
    start = budget.used if budget else 0
    try:
        with tarfile.open(archive) as tar:
            unsafe, total = [], start
            for member in tar:  # lazily: each header is checked before the data behind it is read
                if (reason := _unsafe_reason(member, root)) is not None:
                    unsafe.append((member.name, reason))  # never extracted, so not charged
                else:
                    total = _charge(archive, member, total, budget)
            _refuse_unsafe(archive, unsafe)

        names: list[str] = []
        total = start

        def guard(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo:
            nonlocal total
            if (reason := _unsafe_reason(member, root)) is not None:
                _refuse_unsafe(archive, [(member.name, reason)])
            total = _charge(archive, member, total, budget)
            names.append(member.name)
            return tarfile.data_filter(member, path)

        with tarfile.open(archive) as tar:
            tar.extractall(dest_dir, filter=guard)
    except tarfile.FilterError as exc:
        raise UnsafeArchiveError(f"{archive}: refusing unsafe member '{exc.tarinfo.name}': {exc}") from exc
    except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
        raise ArchiveError(f"{archive}: cannot extract: {exc}") from exc
    if budget:
        budget.used = total
    return Extracted(names, total - start)
