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

    compressor = zlib.compressobj(9)
    idat, left = [], height if rows is None else rows
    row = b"\x00" + bytes(3 * width) if left else b""  # filter byte 0, then the pixels
    while left:  # a few rows at a time: never the whole image in memory
        step = min(left, max(1, (16 << 20) // len(row)))
        idat.append(compressor.compress(row * step))
        left -= step
    idat.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(idat)) + chunk(b"IEND", b"")


def gif_lzw(width: int, height: int) -> bytes:
    """The image data of a ``width`` x ``height`` GIF frame of colour 0, as Pillow writes it: the
    LZW code size, the data sub-blocks, the terminator. One colour compresses about 1000:1."""
    import io

    from PIL import Image

    frame = Image.new("P", (width, height), 0)
    frame.putpalette([0, 0, 0, 255, 255, 255])
    buffer = io.BytesIO()
    frame.save(buffer, "GIF")
    data = buffer.getvalue()
    descriptor = data.index(b"\x2c", 13 + 6)  # after the header, screen and 2-colour table
    return data[descriptor + 10:-1]  # from the code size to the terminator, without the trailer


def gif_of_frames(screen: tuple[int, int], frames: list[tuple[int, int, int, int]], delay: bool = False) -> bytes:
    """A GIF whose logical screen is ``screen`` (width, height) and whose frames are (left, top,
    width, height), each of colour 0, complete: a decoder fills every frame it declares, however
    far it reaches past the screen. ``delay``: a graphics control extension before each frame."""
    header = b"GIF89a" + struct.pack("<HHBBB", *screen, 0x80, 0, 0) + bytes([0, 0, 0, 255, 255, 255])
    control = b"\x21\xf9\x04\x00\x0a\x00\x00\x00" if delay else b""
    body = b"".join(control + b"\x2c" + struct.pack("<HHHHB", *frame, 0) + gif_lzw(*frame[2:]) for frame in frames)
    return header + body + b"\x3b"


def jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each marker segment of a JPEG after SOI; a scan's end includes its
    entropy-coded data (up to the next marker that is not a stuffed byte or a restart)."""
    segments, at = [], 2
    while at < len(data):
        marker = data[at + 1]
        if marker == 0xD9:
            return [*segments, (marker, at, at + 2)]
        end = at + 2 + struct.unpack(">H", data[at + 2:at + 4])[0]
        if marker == 0xDA:
            while not (data[end] == 0xFF and data[end + 1] != 0x00 and not 0xD0 <= data[end + 1] <= 0xD7):
                end += 1
        segments.append((marker, at, end))
        at = end
    return segments


def jpeg_with_scans(jpeg: bytes, repeats: int) -> bytes:
    """``jpeg`` (progressive) with its last scan, and the Huffman tables written for it, repeated
    ``repeats`` more times: libjpeg reads each again, one more pass over the image (about 64 bytes
    a scan of an image of one colour; its decoder only warns)."""
    segments = jpeg_segments(jpeg)
    scan = [s for s in segments if s[0] == 0xDA][-1]
    tables = [s for s in segments if s[0] == 0xC4 and s[2] == scan[1]]
    again = b"".join(jpeg[start:end] for _, start, end in [*tables, scan])
    return jpeg[:segments[-1][1]] + again * repeats + b"\xff\xd9"
