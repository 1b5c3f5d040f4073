"""detkit.core.tree: a folder from strangers is listed and read without blocking or leaving it."""

from __future__ import annotations

import os

import pytest

from detkit.core.tree import NotRegularFileError, open_regular, regular_files
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
    assert regular_files(tmp_path, "INPUT", tmp_path / "out", "OUTPUT: outputs are not inputs") == (
        ["in.jpg"], {"back": "link into OUTPUT: outputs are not inputs"})
