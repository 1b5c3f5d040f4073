"""Image bytes for tests and benchmarks that Pillow would not write."""

from __future__ import annotations

import struct
import zlib


def png_declaring(width: int, height: int, rows: int | None = 8) -> bytes:
    """A PNG whose IHDR declares ``width`` x ``height`` black RGB pixels and whose IDAT holds the
    first ``rows`` of them (``None``: all, a valid image). Zeros compress about 1000:1, so even a
    complete 20000 x 20000 one (1.2 GB decoded) is about 1 MB; 8 rows make a few hundred bytes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = b"\x00" + bytes(3 * width)  # filter byte 0, then the pixels
    compressor = zlib.compressobj(9)
    idat, left = [], height if rows is None else rows
    while left:  # a few rows at a time: never the whole image in memory
        step = min(left, max(1, (16 << 20) // len(row)))
        idat.append(compressor.compress(row * step))
        left -= step
    idat.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(idat)) + chunk(b"IEND", b"")
