"""detkit.core.tree: a folder from strangers is listed and read without blocking or leaving it."""

from __future__ import annotations

import os
import socket

import pytest

from detkit.core.tree import NotRegularFileError, TooLargeError, copy_regular_files, open_regular, regular_files
from detkit.serve.batch import read_picture


def test_a_file_swapped_for_a_fifo_after_the_listing_is_refused_without_blocking(tmp_path):
    path = tmp_path / "cat.jpg"
    path.write_bytes(b"\xff\xd8\xff")
    assert regular_files(tmp_path, "INPUT") == (["cat.jpg"], {})
    path.unlink()
    os.mkfifo(path)  # no writer: a blocking open would wait for ever
    with pytest.raises(NotRegularFileError, match="a FIFO \\(named pipe\\), not a regular file"):
        open_regular(tmp_path, "cat.jpg")
    assert read_picture(tmp_path, "cat.jpg") == f"cannot read it: [Errno 22] a FIFO (named pipe), not a regular " \
                                                f"file: '{path}'"


@pytest.fixture
def outside(tmp_path):
    """A folder next to the one listed: a secret file, and a FIFO no one writes to (opening it for
    reading would wait for ever)."""
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "cat.jpg").write_bytes(b"\xff\xd8\xff secret")
    os.mkfifo(tmp_path / "outside" / "fifo")
    return tmp_path / "outside"


def test_a_link_pointed_out_of_the_folder_after_the_listing_is_not_followed(tmp_path, outside):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"\xff\xd8\xff inside")
    (folder / "alias.jpg").symlink_to("cat.jpg")
    assert regular_files(folder, "INPUT") == (["alias.jpg", "cat.jpg"], {})
    with open_regular(folder, "alias.jpg") as f:  # a link to a file inside: read
        assert f.read() == b"\xff\xd8\xff inside"
    for target in ("cat.jpg", "fifo"):
        (folder / "alias.jpg").unlink()
        (folder / "alias.jpg").symlink_to(outside / target)
        with pytest.raises(NotRegularFileError, match=f"link to '{outside / target}', outside the folder"):
            open_regular(folder, "alias.jpg")
    assert read_picture(folder, "alias.jpg").startswith("cannot read it: ")


def test_a_folder_swapped_for_a_link_out_after_the_listing_is_not_followed(tmp_path, outside):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "cat.jpg").write_bytes(b"\xff\xd8\xff inside")
    assert regular_files(folder, "INPUT") == (["sub/cat.jpg"], {})
    (folder / "sub").rename(folder / "old")
    (folder / "sub").symlink_to(outside)  # INPUT/sub/cat.jpg is now the secret
    with pytest.raises(OSError, match="Too many levels of symbolic links|Not a directory"):
        open_regular(folder, "sub/cat.jpg")
    assert read_picture(folder, "sub/cat.jpg").startswith("cannot read it: ")


def test_a_regular_file_reads_whole(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(bytes(range(256)) * 300)
    with open_regular(tmp_path, "a.bin") as f:
        assert f.read() == path.read_bytes()


def test_a_folder_that_is_skipped_is_neither_searched_nor_reached_through_a_link(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "answer.json").write_text("{}")
    (tmp_path / "in.jpg").write_bytes(b"x")
    (tmp_path / "back").symlink_to(tmp_path / "out" / "answer.json")
    (tmp_path / "same.jpg").symlink_to("in.jpg")  # inside, and not into the skipped folder: read
    assert regular_files(tmp_path, "INPUT", tmp_path / "out", "OUTPUT: outputs are not inputs") == (
        ["in.jpg", "same.jpg"], {"back": "link into OUTPUT: outputs are not inputs"})


def test_a_file_swapped_for_a_folder_after_the_listing_is_refused(tmp_path):
    (tmp_path / "cat.jpg").mkdir()
    with pytest.raises(NotRegularFileError, match="^\\[Errno 22\\] a folder, not a regular file: "):
        open_regular(tmp_path, "cat.jpg")


def test_every_path_that_is_not_read_is_named_with_why(tmp_path):
    root, outside = tmp_path / "in", tmp_path / "outside"
    (root / "sub" / "deeper").mkdir(parents=True)
    outside.mkdir()
    (outside / "cat.jpg").write_bytes(b"x")
    (root / "a.jpg").write_bytes(b"a")
    (root / "sub" / "deeper" / "b.jpg").write_bytes(b"b")
    os.mkfifo(root / "fifo")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(root / "sub" / "socket"))
    links = {"same.jpg": "a.jpg", "sub/up.jpg": "../a.jpg", "loop": "loop", "dangling.jpg": "missing.jpg",
             "folder": "sub", "to-fifo": "fifo", "sub/to-socket": "socket", "out.jpg": "../outside/cat.jpg"}
    for link, target in links.items():
        (root / link).symlink_to(target)
    assert regular_files(root, "INPUT") == (["a.jpg", "same.jpg", "sub/deeper/b.jpg", "sub/up.jpg"], {
        "fifo": "a FIFO (named pipe): not read",
        "sub/socket": "a socket: not read",
        "loop": "link loop: 'loop' leads back to a link on its way",
        "dangling.jpg": "dangling link: 'missing.jpg' does not exist",
        "folder": "link to a folder: not followed (the files in INPUT are read under their own paths)",
        "to-fifo": "link to a FIFO (named pipe): not read",
        "sub/to-socket": "link to a socket: not read",
        "out.jpg": f"link to '{outside / 'cat.jpg'}', outside INPUT: not followed"})


def test_a_tree_deeper_than_the_longest_path_is_named_where_it_cannot_be_examined(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"a")
    (tmp_path / "z.jpg").write_bytes(b"z")
    # Made one folder at a time from the one above (a path of them all would be too long to make).
    name = "d" * 250
    depth = os.pathconf("/", "PC_PATH_MAX") // len(name) + 1
    folder = os.open(tmp_path, os.O_RDONLY)
    for _ in range(depth):
        os.mkdir(name, dir_fd=folder)
        inner = os.open(name, os.O_RDONLY, dir_fd=folder)
        os.close(folder)
        folder = inner
    os.close(folder)
    files, unread = regular_files(tmp_path, "INPUT")
    assert files == ["a.jpg", "z.jpg"]
    [(rel, reason)] = unread.items()
    assert rel.startswith(f"{name}/{name}/") and len(str(tmp_path / rel)) >= os.pathconf("/", "PC_PATH_MAX")
    assert reason == "cannot be examined: File name too long"


def test_a_copy_takes_every_file_up_to_its_limit_and_refuses_the_one_past_it(tmp_path):
    source, dest = tmp_path / "src", tmp_path / "dest"
    (source / "a" / "b").mkdir(parents=True)
    files = {"one.jpg": b"1" * 10, "a/two.jpg": b"2" * 10, "a/b/three.jpg": b"3" * 10}
    for rel, data in files.items():
        (source / rel).write_bytes(data)
    assert copy_regular_files(source, dest, "dataset.local_dir", 30, "limit") == (30, {})
    assert {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()} == files
    with pytest.raises(TooLargeError) as err:
        copy_regular_files(source, tmp_path / "again", "dataset.local_dir", 29, "limit")
    assert str(err.value) == (f"{source / 'one.jpg'}: refusing it (10 bytes): with it dataset.local_dir would copy "
                              "30 bytes, more than limit = 29; nothing was kept")
