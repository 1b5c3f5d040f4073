"""detkit.data.images: what decoding an image would cost is read from its bytes, as TensorFlow's
decoder reads them, and an image over the limits is refused before it is decoded."""

from __future__ import annotations

import functools
import io
import struct
import time

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from detkit.data import images
from detkit.data.images import ImageLimits
from harness.images import gif_of_frames, jpeg_with_scans, png_declaring
from harness.memory import growths_in_a_fresh_process

LIMITS = ImageLimits(max_pixels=25_000_000, max_jpeg_scans=64)


def pillow_image(fmt: str, width: int, height: int, **options) -> bytes:
    pixels = np.random.default_rng(width * height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert("RGBA" if options.pop("alpha", False) else "RGB").save(buffer, fmt, **options)
    return buffer.getvalue()


def flat(fmt: str, width: int, height: int, mode: str = "RGB", **options) -> bytes:
    """One colour: a few KB however many pixels, as hostile files are."""
    buffer = io.BytesIO()
    Image.new(mode, (width, height), (90, 140, 60, 255)[:len(mode)] if mode != "L" else 90).save(buffer, fmt, **options)
    return buffer.getvalue()


def top_down_bmp(width: int, height: int) -> bytes:
    """A BMP whose rows run top to bottom: the header's height is negative."""
    data = bytearray(pillow_image("BMP", width, height))
    data[22:26] = (-height).to_bytes(4, "little", signed=True)
    return bytes(data)


def cost(encoded: bytes) -> dict:
    c = images.decode_cost(tf.constant(encoded))
    return {k: v.numpy().decode() if k == "detail" else v.numpy().item() for k, v in c._asdict().items()}


def decode(encoded: bytes, limits: ImageLimits = LIMITS) -> tf.Tensor:
    return images.decode(tf.constant(encoded), limits)


def refusal(encoded: bytes, limits: ImageLimits = LIMITS) -> str:
    with pytest.raises(tf.errors.InvalidArgumentError) as refused:
        decode(encoded, limits)
    return refused.value.message


# cjxl (libjxl 0.7) output of a flat 37 x 53 image: no JPEG XL encoder is installed with the project.
JXL_37X53 = bytes.fromhex(
    "ff0aa001488084e24200128802002c015de5120000152aa38c1bbc9cebf9f24387c5b48deb0c6db56d6149a2c838364927700829b0"
    "415131c61849c520c6e08131c648268efc01601c9e1140951ee378f97e006f39a107a2594902")


HEADERS = {
    **{f"{fmt} {w}x{h}": (pillow_image(fmt, w, h), w, h)
       for fmt in ("JPEG", "PNG", "GIF", "BMP") for w, h in ((37, 53), (300, 7), (1, 1))},
    "progressive JPEG": (pillow_image("JPEG", 61, 29, progressive=True), 61, 29),
    "top-down BMP": (top_down_bmp(37, 53), 37, 53),
    "WebP lossy (VP8)": (pillow_image("WEBP", 37, 53), 37, 53),
    "WebP lossless (VP8L)": (pillow_image("WEBP", 301, 7, lossless=True), 301, 7),
    "WebP with alpha (VP8X)": (pillow_image("WEBP", 37, 53, alpha=True), 37, 53),
}


@pytest.mark.parametrize("case", HEADERS, ids=list(HEADERS))
def test_encoded_image_size_reads_the_header_as_the_decoder_does(case):
    encoded, width, height = HEADERS[case]
    size = [int(side) for side in images.encoded_image_size(tf.constant(encoded))]
    assert size == [height, width]
    assert tf.io.decode_image(encoded, channels=3, expand_animations=False).shape == (height, width, 3)


def test_a_small_png_declaring_a_huge_image_is_sized_and_refused_before_decoding():
    bomb = png_declaring(20000, 20000)
    assert len(bomb) < 4096
    assert [int(side) for side in images.encoded_image_size(tf.constant(bomb))] == [20000, 20000]
    assert ("image of 20000 x 20000 pixels exceeds export.max_image_pixels = 25000000: refused before decoding"
            in refusal(bomb))
    exactly = HEADERS["PNG 37x53"][0]  # at the limit: decoded
    assert decode(exactly, ImageLimits(37 * 53, 64)).shape == (53, 37, 3)
    assert "image of 37 x 53 pixels exceeds" in refusal(exactly, ImageLimits(37 * 53 - 1, 64))


@pytest.mark.parametrize("encoded", [b"", b"not an image", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"BM"],
                         ids=["empty", "text", "PNG signature only", "GIF signature only", "BMP signature only"])
def test_bytes_without_a_readable_size_are_left_to_the_decoder(encoded):
    assert [int(side) for side in images.encoded_image_size(tf.constant(encoded))] == [-1, -1]
    with pytest.raises(tf.errors.InvalidArgumentError):
        decode(encoded)


def test_sides_whose_product_overflows_are_refused():
    bomb = png_declaring(2**32 - 1, 2**32 - 1, rows=0)
    assert "image of 4294967295 x 4294967295 pixels exceeds" in refusal(bomb)


def test_jpeg_xl_which_the_decoder_reads_is_refused_unread():
    assert tf.io.decode_image(JXL_37X53, channels=3).shape == (53, 37, 3)
    assert "JPEG XL images are not served" in refusal(JXL_37X53)


# --------------------------------------------------------------------------- GIF


def animated(frames: list[Image.Image], **options) -> bytes:
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], **options)
    return buffer.getvalue()


def moving_square(count: int) -> list[Image.Image]:
    """Frames Pillow stores as small offset rectangles (only what changed), with local colour tables."""
    frames = []
    for i in range(count):
        frame = Image.new("RGB", (120, 90), (20, 20, 20))
        frame.paste((200 - 10 * i, 30 * i % 255, 90), (10 + 7 * i, 5 + 3 * i, 30 + 7 * i, 25 + 3 * i))
        frames.append(frame)
    return frames


GIFS = {  # real encoders' GIFs and hand-made ones the decoder reads: the walk must see what giflib sees
    "still": pillow_image("GIF", 37, 53),
    "animated, delta frames, a loop extension": animated(moving_square(6), loop=0, duration=40, optimize=True),
    "interlaced with a comment": animated(moving_square(3), interlace=True, comment=b"made \x00\x2c for the test"),
    "frames past the screen": gif_of_frames((10, 10), [(0, 0, 10, 10), (5, 5, 40, 30)], delay=True),
    "a first frame wider than the screen": gif_of_frames((10, 10), [(0, 0, 64, 8)]),
}


@pytest.mark.parametrize("case", GIFS, ids=list(GIFS))
def test_a_gif_is_walked_frame_by_frame_as_its_decoder_reads_it(case):
    encoded = GIFS[case]
    with Image.open(io.BytesIO(encoded)) as gif:
        frames = [frame.tile[0][1] for frame in _frames(gif)]  # (left, top, right, bottom) as stored
    got = cost(encoded)
    decoded = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    assert (got["height"], got["width"]) == decoded.shape[:2]  # the canvas: the widest and the highest frame
    assert got["width"] == max(right - left for left, _, right, _ in frames)
    frame_pixels = sum((right - left) * (bottom - top) for left, top, right, bottom in frames)
    assert got["bytes"] == frame_pixels + 3 * got["width"] * got["height"]
    assert got["walked"] and got["detail"].startswith(f"{len(frames)} frames of {frame_pixels} pixels")


def _frames(gif):
    for index in range(gif.n_frames):
        gif.seek(index)
        yield gif


def test_frames_larger_than_the_declared_screen_are_refused_before_decoding():
    # A 10 x 10 screen; its second frame declares 6000 x 6000: the decoder allocates that frame and a
    # canvas as large, whatever the screen says (144 MB from a 27 KB file).
    bomb = gif_of_frames((10, 10), [(0, 0, 10, 10), (0, 0, 6000, 6000)])
    assert len(bomb) < 30_000
    limits = ImageLimits(max_pixels=1_000_000, max_jpeg_scans=64)
    small_bomb = gif_of_frames((10, 10), [(0, 0, 10, 10), (0, 0, 1001, 1001)])  # 4 MB: traces the refusal
    (_, warm_up), (refused, refused_with), (decoded, _) = growths_in_a_fresh_process([
        (images.decode, (small_bomb, limits)),
        (images.decode, (bomb, limits)),
        (functools.partial(tf.io.decode_image, channels=3, expand_animations=False), (bomb,)),
    ])
    print(f"GIF bomb of {len(bomb)} bytes: decoding it grew the process by {decoded >> 20} MB, refusing it by "
          f"{refused >> 20} MB")
    assert "exceeds export.max_image_pixels = 1000000" in warm_up
    assert "image of 6000 x 6000 pixels exceeds export.max_image_pixels = 1000000" in refused_with
    assert refused < 5 << 20
    assert decoded > 100 << 20  # what a decode costs: the frame's raster and the canvas


def test_frames_that_together_exceed_the_limit_are_refused():
    frames = [(0, 0, 1000, 1000)] * 8  # each within the limit and the screen; 8 MB of rasters, a 3 MB canvas
    gif = gif_of_frames((1000, 1000), frames, delay=True)
    assert cost(gif)["bytes"] == 8 * 1000 * 1000 + 3 * 1000 * 1000
    allowed = ImageLimits(max_pixels=11_000_000 // 3 + 1, max_jpeg_scans=64)
    assert decode(gif, allowed).shape == (1000, 1000, 3)
    message = refusal(gif, ImageLimits(max_pixels=3_000_000, max_jpeg_scans=64))
    assert ("image of 1000 x 1000 pixels needs 11000000 bytes to decode (8 frames of 8000000 pixels, 1 byte each, "
            "and their canvas of 1000000 pixels, 3 bytes each), more than the 9000000 bytes (3 a pixel) of "
            "export.max_image_pixels = 3000000: refused before decoding") in message


def test_a_wide_frame_and_a_high_frame_make_a_canvas_of_both():
    # 1 x 60000 and 60000 x 1 frames: the decoder's canvas is 60000 x 60000 (10 GB) from 1 KB.
    gif = gif_of_frames((10, 10), [(0, 0, 10, 10), (0, 0, 60000, 1), (0, 0, 1, 60000)])
    assert (cost(gif)["width"], cost(gif)["height"]) == (60000, 60000)
    assert "image of 60000 x 60000 pixels exceeds export.max_image_pixels" in refusal(gif)


def test_a_gif_of_too_many_blocks_to_walk_is_refused():
    comments = b"\x21\xfe\x01x\x00" * (images.GIF_MAX_STEPS + 1)  # 5-byte comment extensions: one walk step each
    gif = gif_of_frames((8, 8), [(0, 0, 8, 8)])
    gif = gif[:19] + comments + gif[19:]  # after the header, screen and colour table
    assert tf.io.decode_image(gif, channels=3, expand_animations=False).shape == (8, 8, 3)
    assert f"GIF of more than {images.GIF_MAX_STEPS} blocks" in refusal(gif)
    few = gif_of_frames((8, 8), [(0, 0, 8, 8)])
    few = few[:19] + b"\x21\xfe\x01x\x00" * 100 + few[19:]
    assert cost(few)["walked"]


# --------------------------------------------------------------------------- JPEG


def test_a_jpeg_read_in_several_scans_counts_its_coefficients():
    baseline, progressive = flat("JPEG", 400, 300), flat("JPEG", 400, 300, progressive=True)
    assert cost(baseline)["bytes"] == 3 * 400 * 300 and cost(baseline)["scans"] == 1
    # 4:2:0: Y at full resolution, Cb and Cr at half each way; 128 bytes per 8 x 8 block.
    y_blocks, c_blocks = 50 * 38, 25 * 19  # 400 / 8 x ceil(300 / 8) rounded up to the 2 x 2 sampling
    got = cost(progressive)
    assert got["scans"] == 10  # libjpeg-turbo's progressive script for colour
    assert got["bytes"] == 3 * 400 * 300 + 128 * (y_blocks + 2 * c_blocks)
    # Within the limit for a baseline JPEG of that size, not for its progressive twin.
    limits = ImageLimits(max_pixels=400 * 300, max_jpeg_scans=64)
    assert decode(baseline, limits).shape == (300, 400, 3)
    assert "bytes of coefficients for 10 scans), more than the 360000 bytes" in refusal(progressive, limits)


@pytest.mark.parametrize("mode, subsampling, scans", [("RGB", 2, 10), ("RGB", 0, 10), ("L", -1, 6), ("CMYK", -1, 18)])
def test_real_encoders_scans_are_well_under_the_limit(mode, subsampling, scans):
    jpeg = flat("JPEG", 64, 48, mode=mode, progressive=True, subsampling=subsampling)
    assert cost(jpeg)["scans"] == scans < LIMITS.max_jpeg_scans
    assert decode(jpeg).shape == (48, 64, 3)


def test_an_exif_thumbnail_does_not_make_a_photo_multi_scan():
    photo = flat("JPEG", 400, 300)
    thumbnail = flat("JPEG", 160, 120, progressive=True)  # its scans sit inside an APP1 segment
    app1 = b"\xff\xe1" + struct.pack(">H", len(thumbnail) + 8) + b"Exif\x00\x00" + thumbnail
    with_thumbnail = photo[:2] + app1 + photo[2:]
    assert decode(with_thumbnail).shape == (300, 400, 3)
    assert cost(with_thumbnail) == cost(photo)


def test_a_jpeg_not_walked_to_its_first_scan_is_charged_its_most():
    photo = flat("JPEG", 400, 300)
    comments = b"\xff\xfe\x00\x03x" * images.JPEG_MAX_SEGMENTS  # empty comments before the frame header
    padded = photo[:2] + comments + photo[2:]
    assert decode(padded).shape == (300, 400, 3)
    # As if read in several scans with every component at full resolution (ceil(w / 8) + 3 blocks a row).
    assert cost(padded)["bytes"] == 3 * 400 * 300 + 128 * 3 * (50 + 3) * (38 + 3)


def test_a_jpeg_of_many_scans_is_refused_before_decoding_in_well_under_a_second():
    # 2000 x 1500, 4:4:4 progressive: within the pixel limit with its coefficients; every repeated
    # scan makes libjpeg pass over all its blocks again (about 10 ms each here: 20 s for these).
    expensive = jpeg_with_scans(flat("JPEG", 2000, 1500, progressive=True, subsampling=0), 2000)
    assert len(expensive) < 200_000
    decode(flat("JPEG", 64, 48, progressive=True))  # the checks' graph built, as a served model's is
    started = time.monotonic()
    message = refusal(expensive)
    seconds = time.monotonic() - started
    assert "JPEG of 2010 scans exceeds export.max_jpeg_scans = 64: refused before decoding" in message
    print(f"a {len(expensive) // 1024} KB JPEG of 2010 scans refused in {seconds:.3f} s")
    assert seconds < 1.0


# --------------------------------------------------------------------------- WebP


def test_a_lossless_webp_counts_the_argb_copy_it_is_decoded_into():
    lossy, lossless = flat("WEBP", 300, 200), flat("WEBP", 300, 200, lossless=True)
    assert cost(lossy)["bytes"] == 3 * 300 * 200
    assert cost(lossless)["bytes"] == 7 * 300 * 200
    limits = ImageLimits(max_pixels=300 * 200, max_jpeg_scans=64)
    assert decode(lossy, limits).shape == (200, 300, 3)
    assert "(lossless WebP: 7 bytes a pixel), more than the 180000 bytes" in refusal(lossless, limits)


def test_animated_webp_is_charged_its_canvas_held_four_times():
    frames = [Image.new("RGB", (64, 48), (i * 60, 0, 0)) for i in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "WEBP", save_all=True, append_images=frames[1:])
    got = cost(buffer.getvalue())
    assert (got["width"], got["height"], got["bytes"]) == (64, 48, 16 * 64 * 48)
