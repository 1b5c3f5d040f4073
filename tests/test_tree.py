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
        open_regular(path)
    assert read_picture(path, "cat.jpg") == f"cannot read it: [Errno 22] a FIFO (named pipe), not a regular file: " \
                                            f"'{path}'"


def test_a_regular_file_reads_whole(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(bytes(range(256)) * 300)
    with open_regular(path) as f:
        assert f.read() == path.read_bytes()


def test_a_folder_that_is_skipped_is_neither_searched_nor_reached_through_a_link(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "answer.json").write_text("{}")
    (tmp_path / "in.jpg").write_bytes(b"x")
    (tmp_path / "back").symlink_to(tmp_path / "out" / "answer.json")
    assert regular_files(tmp_path, "INPUT", tmp_path / "out", "OUTPUT: outputs are not inputs") == (
        ["in.jpg"], {"back": "link into OUTPUT: outputs are not inputs"})
