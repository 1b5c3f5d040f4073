"""Encoded images, checked before they are decoded: what ``tf.io.decode_image`` would allocate and
how long it would work, read from the bytes inside the graph (so TF Serving enforces it too).

``decode`` refuses, with an InvalidArgumentError naming the limit, an image

- of more than ``max_pixels`` pixels (width x height of the decoded image);
- whose decoder would hold more than ``3 x max_pixels`` bytes (``decode_cost``: an RGB image at the
  limit), counting every buffer it fills: every frame of a GIF and the canvas they are drawn on,
  the coefficients of a JPEG read in several scans, the ARGB copy a lossless WebP is decoded into;
- a JPEG of more than ``max_jpeg_scans`` scans (each scan is one more pass over the image);
- a GIF whose blocks are too many to walk (``GIF_MAX_STEPS``);
- in JPEG XL, whose sizes are bit-packed.

What each format's decoder allocates (TensorFlow 2.21's ``decode_image`` with 3 channels; read in
its sources and measured against the process's resident memory, docs/serving.md):

- JPEG (libjpeg-turbo): the image, 3 bytes a pixel; a file read in several scans (progressive,
  or a first scan with fewer components than the frame) also a coefficient buffer of every
  component, 128 bytes per 8 x 8 block at that component's sampling (2 to 8 bytes a pixel).
- PNG (libpng) and BMP: the image, 3 bytes a pixel.
- GIF (giflib's ``DGifSlurp``): every frame, each at its own declared size (1 byte a pixel), all
  held at once, then a canvas as wide as the widest frame and as high as the highest (3 bytes a
  pixel) whatever the logical screen declares.
- WebP (libwebp): lossy, the image (3 bytes a pixel); lossless, also an ARGB copy (4 bytes a
  pixel). Animated WebP and WebP with alpha are refused by the decoder before it allocates
  (3 channels asked); they are charged as an RGBA canvas held four times (16 bytes a pixel).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import tensorflow as tf

BYTES_PER_PIXEL = 3  # a decoded uint8 RGB pixel: max_pixels of them are what a limit allows
HEADER_BYTES = 32  # holds the size fields of every format but JPEG's (extract_jpeg_shape finds those)
# tf.io.decode_image also reads JPEG XL, whose size is bit-packed: it is refused rather than parsed.
JPEG_XL = (b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n")  # bare codestream, ISO BMFF container
# Walking a GIF's blocks is a loop of one step per block (a frame with its graphics control is two
# blocks; a run of data sub-blocks of one size is skipped in one step). A step is some 60 TensorFlow
# ops, 0.1-0.2 ms of CPU: this many bound the walk to about half a second. A GIF with more is refused.
GIF_MAX_STEPS = 4096
GIF_RUN_WINDOW = 4096  # sub-blocks of one size skipped per step: 1 MB of 255-byte sub-blocks
GIF_BLOCKS_PER_ITERATION = 8  # steps unrolled in one loop iteration, which costs about as much as a step
# Marker segments read before a JPEG's first scan; real files have about ten. A file with more is
# charged as if read in several scans at full resolution, the most its decoder could allocate.
JPEG_MAX_SEGMENTS = 256
JPEG_BLOCK_BYTES = 128  # libjpeg's coefficient buffer: 64 16-bit coefficients per 8 x 8 block
WEBP_BYTES_PER_PIXEL = {"lossy": 3, "lossless": 3 + 4, "animated or alpha": 16}


@dataclasses.dataclass(frozen=True)
class ImageLimits:
    """What the serving signatures refuse before decoding (``export.max_image_pixels``,
    ``export.max_jpeg_scans``)."""

    max_pixels: int
    max_jpeg_scans: int

    @classmethod
    def of(cls, export: Any) -> ImageLimits:
        """From the config's ``export`` section."""
        return cls(int(export.max_image_pixels), int(export.max_jpeg_scans))


class DecodeCost(NamedTuple):
    """What decoding an encoded image would take (int64 scalars but ``detail``)."""

    height: tf.Tensor  # of the decoded image; -1 when the bytes hold no readable size
    width: tf.Tensor
    bytes: tf.Tensor  # the decoder's pixel buffers together
    scans: tf.Tensor  # JPEG: the scans (SOS markers) from the first on; 1 for other formats
    walked: tf.Tensor  # bool: the GIF walk reached the end of the frames (always true for others)
    detail: tf.Tensor  # string: what ``bytes`` counts, for the refusal


def decode(encoded: tf.Tensor, limits: ImageLimits | None = None) -> tf.Tensor:
    """Encoded image bytes (scalar string) -> uint8 RGB [h, w, 3], its first frame for animations;
    with ``limits``, refused before decoding when over them (see the module doc)."""
    checks = [] if limits is None else [refuse_over(encoded, limits)]
    with tf.control_dependencies(checks):
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def refuse_over(encoded: tf.Tensor, limits: ImageLimits) -> tf.Operation:
    """An assertion that fails, naming the limit, for an image over ``limits`` (the module doc)."""
    message = refusal(encoded, limits.max_pixels, limits.max_jpeg_scans)
    return tf.debugging.Assert(tf.strings.length(message) == 0, [message])


@tf.function(autograph=False, input_signature=[tf.TensorSpec([], tf.string), tf.TensorSpec([], tf.int64),
                                               tf.TensorSpec([], tf.int64)])
def refusal(encoded: tf.Tensor, max_pixels: tf.Tensor, max_jpeg_scans: tf.Tensor) -> tf.Tensor:
    """Why an image is over the limits (``export.max_image_pixels``, ``export.max_jpeg_scans``); ""
    when it is within them. One graph whatever the limits: a served model runs it, not Python."""
    cost = decode_cost(encoded)
    budget = BYTES_PER_PIXEL * max_pixels

    def text(value):
        return tf.strings.as_string(value)

    size = tf.strings.join([text(cost.width), " x ", text(cost.height), " pixels"])
    # Each side within the limit first: two unsigned 32-bit PNG sides would overflow int64's product.
    fits = (cost.height <= max_pixels) & (cost.width <= max_pixels)
    failures = [  # (refused, message): the first that applies is reported
        (~fits | (cost.height * cost.width > max_pixels),
         tf.strings.join(["image of ", size, " exceeds export.max_image_pixels = ", text(max_pixels)])),
        (cost.bytes > budget,
         tf.strings.join(["image of ", size, " needs ", text(cost.bytes), " bytes to decode (", cost.detail,
                          "), more than the ", text(budget), f" bytes ({BYTES_PER_PIXEL} a pixel) of "
                          "export.max_image_pixels = ", text(max_pixels)])),
        (cost.scans > max_jpeg_scans,
         tf.strings.join(["JPEG of ", text(cost.scans), " scans exceeds export.max_jpeg_scans = ",
                          text(max_jpeg_scans)])),
        (~cost.walked, tf.constant(f"GIF of more than {GIF_MAX_STEPS} blocks (frames, extensions and runs of "
                                   "data sub-blocks of one size) to walk")),
    ]
    message = tf.constant("")
    for refused, reason in reversed(failures):
        message = tf.where(refused, tf.strings.join([reason, ": refused before decoding"]), message)
    return message


# ---------------------------------------------------------------------------- what decoding costs


@tf.function(autograph=False, input_signature=[tf.TensorSpec([], tf.string)])
def decode_cost(encoded: tf.Tensor) -> DecodeCost:
    """What ``tf.io.decode_image(encoded, channels=3, expand_animations=False)`` would allocate and
    how many JPEG scans it would run, read without decoding (see the module doc). Bytes of no
    format it reads, or too short to hold a size, cost nothing here: the decoder refuses them."""
    length = tf.cast(tf.strings.length(encoded), tf.int64)
    head = _header(encoded)

    def starts(signature: bytes, at: int = 0) -> tf.Tensor:
        return (length >= at + len(signature)) & tf.reduce_all(head[at:at + len(signature)] == list(signature))

    jpeg_xl = tf.reduce_any([starts(signature) for signature in JPEG_XL])
    refuse_jpeg_xl = tf.debugging.Assert(~jpeg_xl, ["JPEG XL images are not served: send JPEG, PNG, GIF, BMP or WebP"])
    webp = starts(b"RIFF") & starts(b"WEBP", 8)
    kinds = [  # (these bytes, their cost), in decode_image's order of signatures
        (starts(b"\xff\xd8\xff"), lambda: _jpeg_cost(encoded)),
        (starts(b"\x89PNG\r\n\x1a\n") & (length >= 24),
         lambda: _plain(_uint(head, 20, 4, big_endian=True), _uint(head, 16, 4, big_endian=True))),
        (starts(b"GIF8") & (length >= 13), lambda: _gif_cost(encoded)),
        (starts(b"BM") & (length >= 26), lambda: _plain(tf.abs(_signed32(_uint(head, 22, 4))),
                                                        tf.abs(_signed32(_uint(head, 18, 4))))),
        (webp & (length >= 30), lambda: _webp_cost(encoded, head)),
    ]
    with tf.control_dependencies([refuse_jpeg_xl]):
        branch = tf.argmax(tf.stack([tf.cast(known, tf.int32) for known, _ in kinds] + [1]), output_type=tf.int32)
    unread = tf.constant(-1, tf.int64)
    return DecodeCost(*tf.switch_case(branch, [cost for _, cost in kinds] + [lambda: _plain(unread, unread)]))


def encoded_image_size(encoded: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(height, width), int64 scalars, of the image ``decode`` would return, read without decoding;
    (-1, -1) for bytes whose size cannot be read (the decoder refuses those)."""
    cost = decode_cost(encoded)
    return cost.height, cost.width


def _plain(height: tf.Tensor, width: tf.Tensor, bytes_per_pixel: int | tf.Tensor = BYTES_PER_PIXEL,
           detail: str | tf.Tensor = "3 bytes a pixel") -> tuple:
    decoded = tf.where(height > 0, height * width * tf.cast(bytes_per_pixel, tf.int64), 0)
    return height, width, decoded, tf.constant(1, tf.int64), tf.constant(True), tf.convert_to_tensor(detail)


def _webp_cost(encoded: tf.Tensor, head: tf.Tensor) -> tuple:
    """The VP8X canvas, or the VP8 / VP8L bitstream header of a simple file."""
    chunk = tf.strings.substr(encoded, 12, 4)
    extended, lossless = chunk == "VP8X", chunk == "VP8L"
    vp8l = _uint(head, 21, 4)
    height = tf.where(extended, _uint(head, 27, 3) + 1,
                      tf.where(lossless, vp8l // 2**14 % 2**14 + 1, _uint(head, 28, 2) % 2**14))
    width = tf.where(extended, _uint(head, 24, 3) + 1, tf.where(lossless, vp8l % 2**14 + 1, _uint(head, 26, 2) % 2**14))
    # VP8X flags: alpha 0x10, animation 0x02; a simple VP8L says whether it uses alpha at bit 28.
    flags = head[20]
    alpha_or_animated = tf.where(extended, (flags // 16 % 2 + flags // 2 % 2) > 0, lossless & (vp8l // 2**28 % 2 > 0))
    # A VP8X file's image is in a later chunk: any "VP8L" in it is taken for a lossless one.
    lossless |= extended & (tf.size(tf.strings.split(encoded, "VP8L")) > 1)
    kind = tf.where(alpha_or_animated, 2, tf.where(lossless, 1, 0))
    names = list(WEBP_BYTES_PER_PIXEL)
    per_pixel = tf.gather(list(WEBP_BYTES_PER_PIXEL.values()), kind)
    detail = tf.strings.join([tf.gather(names, kind), " WebP: ", tf.strings.as_string(per_pixel), " bytes a pixel"])
    return _plain(height, width, per_pixel, detail)


# ---------------------------------------------------------------------------- GIF


def _gif_cost(encoded: tf.Tensor) -> tuple:
    """Walk the blocks as giflib's DGifSlurp reads them: every image descriptor (0x2C) it reaches
    before the trailer (0x3B), anything else, or the end of the bytes. Each frame counts its own
    width x height (giflib's raster), the canvas the widest and the highest of them."""
    n = tf.cast(tf.strings.length(encoded), tf.int64)
    # The bytes, then -1s: a read at n or past it (clamped to n) sees -1. 16 bits: 2 bytes a byte.
    data = tf.concat([tf.cast(tf.io.decode_raw(encoded, tf.uint8), tf.int16), -tf.ones([16], tf.int16)], 0)
    head_offsets = tf.range(10, dtype=tf.int64)

    def read(at, offsets=None):
        at = tf.minimum(at, n)
        return tf.cast(tf.gather(data, at if offsets is None else at + offsets), tf.int64)

    def colour_table(flags):  # bytes of the colour table that a packed-fields byte announces
        return tf.where(flags >= 128, 3 * tf.bitwise.left_shift(tf.constant(2, tf.int64), flags % 8), 0)

    def block(pos, between_blocks, frames, frame_pixels, widest, highest, ended):
        # A block's head, where the walk is between blocks: an extension (0x21, its label, sub-blocks)
        # or an image (0x2C, its 9-byte descriptor, a local colour table, the LZW code size, sub-blocks).
        introducer, _, _, _, _, w0, w1, h0, h1, flags = tf.unstack(read(pos, head_offsets))
        live = between_blocks & ~ended
        image = live & (introducer == 0x2C) & (flags >= 0)
        extension = live & (introducer == 0x21)
        width, height = tf.where(image, w0 + 256 * w1, 0), tf.where(image, h0 + 256 * h1, 0)
        stops = live & ~image & ~extension  # the trailer, or what giflib cannot read
        pos = tf.where(image, pos + 11 + colour_table(flags), tf.where(extension, pos + 2, pos))
        # Data sub-blocks: a run of one size, one more sub-block, then the terminator if it is next.
        size = read(pos)
        stride = tf.maximum(size, 0) + 1
        window = tf.reshape(data[tf.minimum(pos, n):tf.minimum(pos + GIF_RUN_WINDOW * stride, n + 1):stride], [-1])
        differs = tf.cast(window != tf.cast(size, tf.int16), tf.int32)
        run = tf.where(tf.reduce_max(differs) > 0, tf.cast(tf.argmax(differs), tf.int64),
                       tf.size(window, out_type=tf.int64))
        last = tf.where(size > 0, pos + run * stride, pos)
        size = read(last)
        after = tf.where(size > 0, last + 1 + size, last)
        terminator = read(after)
        moves = ~ended & ~stops
        ends = (terminator == 0) & moves
        return (tf.where(moves, tf.where(ends, after + 1, after), pos), ends | (between_blocks & ~moves),
                frames + tf.cast(image, tf.int64), frame_pixels + width * height,
                tf.maximum(widest, width), tf.maximum(highest, height),
                ended | stops | (moves & ((size < 0) | (terminator < 0))))  # the bytes end inside sub-blocks

    def blocks(*state):  # a few blocks a loop iteration: the loop's own work is shared
        for _ in range(GIF_BLOCKS_PER_ITERATION):
            state = block(*state)
        return state

    zero = tf.constant(0, tf.int64)
    state = (13 + colour_table(read(tf.constant(10, tf.int64))), tf.constant(True), zero, zero, zero, zero,
             tf.constant(False))
    _, _, frames, frame_pixels, widest, highest, ended = tf.while_loop(
        lambda *state: ~state[-1], blocks, state, maximum_iterations=GIF_MAX_STEPS // GIF_BLOCKS_PER_ITERATION)
    canvas = widest * highest
    detail = tf.strings.join([tf.strings.as_string(frames), " frames of ", tf.strings.as_string(frame_pixels),
                              " pixels, 1 byte each, and their canvas of ", tf.strings.as_string(canvas),
                              " pixels, 3 bytes each"])
    return (highest, widest, frame_pixels + BYTES_PER_PIXEL * canvas, tf.constant(1, tf.int64), ended, detail)


# ---------------------------------------------------------------------------- JPEG


def _jpeg_cost(encoded: tf.Tensor) -> tuple:
    """The frame header's size (``extract_jpeg_shape``, libjpeg's own parser, which refuses a
    broken one); the segments up to the first scan, walked as libjpeg reads them, for the frame's
    components and whether it is read in several scans; the SOS markers from the first scan on."""
    height, width, components = tf.unstack(tf.cast(tf.image.extract_jpeg_shape(encoded), tf.int64))
    data = tf.io.decode_raw(encoded, tf.uint8)
    n = tf.size(data, out_type=tf.int64)

    def at(i):
        return tf.where(i < n, tf.cast(tf.gather(data, tf.clip_by_value(i, 0, n - 1)), tf.int64), -1)

    def step(pos, frame, scan, stopped, steps):
        marker = at(pos + 1)
        fill = (at(pos) == 0xFF) & (marker == 0xFF)  # markers may be preceded by any number of 0xFF
        found_frame = (marker >= 0xC0) & (marker <= 0xCF) & (marker != 0xC4) & (marker != 0xC8) & (marker != 0xCC)
        standalone = ((marker >= 0xD0) & (marker <= 0xD7)) | (marker == 0x01)
        # Anything but a marker here is what libjpeg skips with a warning: the walk gives up instead.
        stops = (at(pos) != 0xFF) | (marker == 0x00) | (marker == 0xD8) | (marker == 0xD9) | (marker < 0)
        found_scan = ~fill & ~stops & (marker == 0xDA)
        frame = tf.where(~fill & found_frame & (frame < 0), pos, frame)
        scan = tf.where(found_scan, pos, scan)
        length = 256 * at(pos + 2) + at(pos + 3)
        pos = tf.where(fill, pos + 1, tf.where(standalone, pos + 2, pos + 2 + length))
        return pos, frame, scan, stops | found_scan, steps + 1

    none = tf.constant(-1, tf.int64)
    _, frame, scan, _, _ = tf.while_loop(lambda *s: ~s[3], step, (tf.constant(2, tf.int64), none, none,
                                                                 tf.constant(False), tf.constant(0, tf.int64)),
                                         maximum_iterations=JPEG_MAX_SEGMENTS)
    read = (frame > 0) & (scan > frame)
    # The frame header: type, length, precision, height, width, components (id, sampling, table).
    count = tf.minimum(at(frame + 9), 10)  # libjpeg refuses more than 10 components before allocating
    sampling = tf.stack([at(frame + 11 + 3 * i) for i in range(10)])[:tf.maximum(count, 0)]
    across, down = sampling // 16, sampling % 16
    blocks = (_round_up(_ceil_div(width * across, 8 * tf.reduce_max(across)), across)
              * _round_up(_ceil_div(height * down, 8 * tf.reduce_max(down)), down))
    progressive = tf.reduce_any(at(frame + 1) == [0xC2, 0xC6, 0xCA, 0xCE])
    several_scans = progressive | (at(scan + 4) < count)
    # Not walked to its first scan: the most it could be, every component at full resolution.
    full = components * (_ceil_div(width, 8) + 3) * (_ceil_div(height, 8) + 3)
    coefficients = JPEG_BLOCK_BYTES * tf.where(read, tf.where(several_scans, tf.reduce_sum(blocks), 0), full)
    # Scan markers: entropy-coded data stuffs every 0xFF, so each scan shows as FF DA; those before
    # the first scan (an embedded EXIF thumbnail's) are not the image's.
    scans = tf.size(tf.strings.split(tf.strings.substr(encoded, tf.where(read, scan, 0), -1), b"\xff\xda"),
                    out_type=tf.int64) - 1
    detail = tf.strings.join(["3 bytes a pixel and ", tf.strings.as_string(coefficients), " bytes of coefficients for ",
                              tf.strings.as_string(scans), " scans"])
    return height, width, BYTES_PER_PIXEL * height * width + coefficients, scans, tf.constant(True), detail


def _ceil_div(a: tf.Tensor, b: tf.Tensor | int) -> tf.Tensor:
    return -(-a // tf.maximum(tf.cast(b, a.dtype), 1))


def _round_up(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    return _ceil_div(a, b) * b


# ---------------------------------------------------------------------------- header bytes


def _header(encoded: tf.Tensor) -> tf.Tensor:
    """The first ``HEADER_BYTES`` bytes (int64 [HEADER_BYTES]), zeros past the end; reads no more."""
    part = tf.strings.substr(encoded, 0, HEADER_BYTES)
    return tf.cast(tf.io.decode_raw(part, tf.uint8, fixed_length=HEADER_BYTES), tf.int64)


def _uint(head: tf.Tensor, at: int, count: int, big_endian: bool = False) -> tf.Tensor:
    weights = [256 ** (count - 1 - i if big_endian else i) for i in range(count)]
    return tf.reduce_sum(head[at:at + count] * tf.constant(weights, tf.int64))


def _signed32(value: tf.Tensor) -> tf.Tensor:
    return tf.where(value >= 2**31, value - 2**32, value)
