"""The regular files under a folder from strangers, found and opened without ever blocking or leaving it.

``regular_files`` lists a folder's tree by ``lstat`` alone: folders are searched (a link to one is
not), regular files are listed, and so is a link that resolves to a regular file inside the folder;
everything else is named with why it is not read: FIFOs, sockets and devices (opening a FIFO blocks
until someone writes), links that loop, dangle, or lead to a folder, a special file or out of the
folder (resolved to be judged, never followed), folders that cannot be listed, paths that cannot be
examined (deeper than the longest path the system takes). ``open_regular`` opens a listed file
without blocking and without leaving the folder, even where a path on the way was swapped for a link
since the listing, and refuses it if it is no longer a regular file; ``copy_regular_files`` copies
what ``regular_files`` lists, within a byte limit. ``make batch`` and the download stage's
``dataset.local_dir`` copy use them."""

from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path
from typing import BinaryIO

# What is not a regular file, by its mode (a folder: what open_regular may find in a listed file's place).
SPECIAL_FILES = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                 (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder"))


class NotRegularFileError(OSError):
    """The path is no longer a regular file."""


def special(mode: int) -> str:
    return next((name for is_kind, name in SPECIAL_FILES if is_kind(mode)), "not a regular file")


def inside(folder: Path, path: Path) -> bool:
    return path == folder or folder in path.parents


def _link_reason(link: Path, root: Path, label: str, skip: Path | None, skip_label: str) -> str | None:
    """Why the link ``link`` under ``root`` is not read, or None: it leads to a regular file in ``root``."""
    target = os.readlink(link)
    try:
        real = Path(os.path.realpath(link, strict=True))
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"link loop: '{target}' leads back to a link on its way"
        if exc.errno == errno.ENOENT:
            return f"dangling link: '{target}' does not exist"
        return f"link to '{target}' cannot be resolved: {exc.strerror}"
    if not inside(root, real):
        return f"link to '{real}', outside {label}: not followed"
    if skip is not None and inside(skip, real):
        return f"link into {skip_label}"
    mode = os.stat(real).st_mode
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return f"link to a folder: not followed (the files in {label} are read under their own paths)"
    return f"link to {special(mode)}: not read"


def regular_files(folder: Path, label: str, skip: Path | None = None,
                  skip_label: str = "") -> tuple[list[str], dict[str, str]]:
    """The regular files under ``folder`` (relative, '/'-separated, sorted) and each other path there
    with why it is not read (module doc). ``label`` names the folder in those reasons; ``skip``, a
    folder inside it (``skip_label`` its name), is neither searched nor read through a link."""
    root = folder.resolve()
    skip = skip.resolve() if skip is not None else None
    files: list[str] = []
    unread: dict[str, str] = {}
    folders = [root]
    while folders:
        current = folders.pop()
        try:
            with os.scandir(current) as listing:
                entries = list(listing)
        except OSError as exc:
            unread[current.relative_to(root).as_posix()] = f"folder that cannot be listed: {exc.strerror}"
            continue
        for entry in entries:
            path = Path(entry.path)
            rel = path.relative_to(root).as_posix()
            try:
                mode = entry.stat(follow_symlinks=False).st_mode
            except FileNotFoundError:  # gone since the folder was listed
                continue
            except OSError as exc:  # e.g. a tree deeper than the system's longest path
                unread[rel] = f"cannot be examined: {exc.strerror}"
                continue
            if stat.S_ISDIR(mode):
                if path != skip:
                    folders.append(path)
            elif stat.S_ISREG(mode):
                files.append(rel)
            elif stat.S_ISLNK(mode):
                reason = _link_reason(path, root, label, skip, skip_label)
                if reason is None:
                    files.append(rel)
                else:
                    unread[rel] = reason
            else:
                unread[rel] = f"{special(mode)}: not read"
    return sorted(files), unread


def open_regular(folder: Path, rel: str) -> BinaryIO:
    """``folder/rel``, a file ``regular_files`` listed, opened for reading without leaving ``folder`` or
    blocking, whatever changed since the listing: each folder on the way is opened from the one above
    without following a link (O_NOFOLLOW), a link at the end is resolved again and its target, if
    still inside, opened the same way, and the file with O_NONBLOCK. Raises ``NotRegularFileError``
    when what was opened is not a regular file, OSError when a link now stands on the way."""
    root = folder.resolve()
    path = root / rel
    if path.is_symlink():
        real = Path(os.path.realpath(path))
        if not inside(root, real):
            raise NotRegularFileError(errno.EXDEV, f"link to '{real}', outside the folder", str(path))
        rel = real.relative_to(root).as_posix()
    *folders, name = rel.split("/")
    at = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in folders:
            inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=at)
            os.close(at)
            at = inner
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY, dir_fd=at)
    finally:
        os.close(at)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(errno.EINVAL, f"{special(mode)}, not a regular file", str(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class TooLargeError(ValueError):
    """Copying would pass the byte limit."""


def copy_regular_files(source: Path, dest: Path, label: str, limit: int, limit_key: str) -> tuple[int, dict[str, str]]:
    """Copy ``source``'s regular files (``regular_files``) to ``dest`` under the same relative paths;
    returns the bytes copied and the paths not read, with why. Refuses, before copying it, the file
    that would take the bytes past ``limit`` (``limit_key`` names the setting)."""
    files, unread = regular_files(source, label)
    copied = 0
    for rel in files:
        with open_regular(source, rel) as f:
            size = os.fstat(f.fileno()).st_size
            if copied + size > limit:
                raise TooLargeError(f"{source / rel}: refusing it ({size:,} bytes): with it {label} would copy "
                                    f"{copied + size:,} bytes, more than {limit_key} = {limit:,}; nothing was kept")
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as out:
                shutil.copyfileobj(f, out)
            copied += size
    return copied, unread
