"""A generated stand-in for the real Oxford-IIIT Pet archives at their per-image scale.

The layout, list files, XML and quirk bytes come from ``sample/make_sample.py`` (the same
code as the embedded sample); only the pictures differ: photo-like instead of flat, 300-500
px a side and about 100 KB a JPEG, as in the real ``images.tar.gz`` (791,918,971 bytes for
about 7,390 images). Each picture is a pet head (fur-like streaked texture, eyes, nose, soft
edge) on a background of noise over many scales plus sensor-like grain, so the JPEG encoder,
the decoder and the model see real-looking work.

Rows: ``per_breed`` trainval and ``test_per_breed`` test images for each of the 37 breeds,
plus every image named in ``make_sample.QUIRKS`` (as a trainval row); the quirk files that
are not images (stray ``.mat`` files, AppleDouble files) are copied from the sample as
make_sample writes them.

    python -m benchmarks.pets_like --out /tmp/pets [--per-breed 8] [--test-per-breed 2]
"""

from __future__ import annotations

import argparse
import hashlib
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from detkit.core.fsio import atomic_write_bytes
from sample import make_sample as ms

SEED = 7390
# Inclusive ranges of the longer and the shorter side: most real images are 500 px on their
# longer side (Flickr's medium size), and no side is under 300 px here.
LONGER_PX, SHORTER_PX = (450, 500), (300, 500)
HEAD_FRACTION = (0.35, 0.8)  # head box's longer side, as a share of the image's shorter side
# Luminance texture and grain (0..255 std) over the whole picture: what gives the JPEGs their
# real size (chroma detail would not: JPEG subsamples it away).
DETAIL, GRAIN = 0.3, 10.0
REAL_IMAGES_BYTES, REAL_IMAGE_COUNT = 791_918_971, 7390


def quirk_images() -> list[str]:
    """Image stems named by any quirk kind; names with a suffix or a folder are not images."""
    return [name for names in ms.QUIRKS.values() for name in names if "." not in name and "/" not in name]


def quirk_files() -> list[str]:
    """Archive paths of the quirk files that are not listed images (stray files, AppleDouble)."""
    names = [name for names in ms.QUIRKS.values() for name in names if "." in name or "/" in name]
    return [name if "/" in name else f"images/{name}" for name in names]


def rows(per_breed: int, test_per_breed: int) -> list[tuple[str, str]]:
    """(image, split) for every listed image, ordered by class id, then number."""
    listed = {f"{b}_{n}": "trainval" for b in ms.CLASSES for n in range(1, per_breed + 1)}
    listed |= {f"{b}_{n}": "test" for b in ms.CLASSES for n in range(per_breed + 1, per_breed + test_per_breed + 1)}
    listed |= {name: "trainval" for name in quirk_images()}
    return sorted(listed.items(), key=lambda row: (ms.class_id(ms.split_name(row[0])[0]), ms.split_name(row[0])[1]))


def _octaves(rng: np.random.Generator, width: int, height: int, channels: int, falloff: float) -> np.ndarray:
    """Noise with structure at every scale from the whole image down to 2 px; octave ``k`` (``2**k``
    cells a side) has amplitude ``2**(-k * falloff)``: 0.6 gives smooth fields, below 0 a grainy
    texture whose finest scales are the strongest."""
    out = np.zeros((height, width, channels), np.float32)
    cells = 2
    while cells <= max(width, height):
        grid = rng.standard_normal((cells + 1, cells + 1, channels)).astype(np.float32)
        layer = np.stack([np.asarray(Image.fromarray(grid[..., c]).resize((width, height), Image.Resampling.BICUBIC))
                          for c in range(channels)], axis=-1)
        out += layer / cells**falloff
        cells *= 2
    return out


def _fur(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Streaks along the vertical (hair): noise stretched far more down than across, fine and coarse."""
    out = np.zeros((height, width), np.float32)
    for across, down, amplitude in ((3, 40, 1.0), (12, 60, 0.6)):
        grid = rng.standard_normal((height // down + 2, width // across + 2)).astype(np.float32)
        out += amplitude * np.asarray(Image.fromarray(grid).resize((width, height), Image.Resampling.BICUBIC))
    return out


def render(image: str) -> tuple[Image.Image, Image.Image, tuple[int, int, int, int]]:
    """The RGB picture, its trimap and the head's tight box (xmin, ymin, xmax, ymax) in pixel edges."""
    breed, n = ms.split_name(image)
    rng = np.random.default_rng([SEED, ms.class_id(breed), n])
    longer = int(rng.integers(LONGER_PX[0], LONGER_PX[1] + 1))
    shorter = int(rng.integers(SHORTER_PX[0], min(longer, SHORTER_PX[1]) + 1))
    width, height = (longer, shorter) if rng.random() < 0.6 else (shorter, longer)
    base = rng.uniform(0.25, 0.75, 3).astype(np.float32)
    pixels = base + 0.09 * _octaves(rng, width, height, 3, falloff=0.6)

    head = rng.uniform(*HEAD_FRACTION) * min(width, height)
    aspect = rng.uniform(0.85, 1.15)
    size_x, size_y = round(head * min(1.0, aspect)), round(head * min(1.0, 1 / aspect))
    x0, y0 = int(rng.integers(0, width - size_x + 1)), int(rng.integers(0, height - size_y + 1))
    if image in ms.QUIRKS.get("box_outside", ()):
        # As in make_sample: the head touches the top and right edges, so clipping the XML's
        # overreaching box recovers it exactly.
        x0, y0 = width - size_x, 0
    mask = ms._head_mask(width, height, x0, y0, size_x, size_y, ms.is_cat(breed))
    box = Image.fromarray(mask).getbbox()
    assert box is not None

    hue = ms.style(breed)[0]
    coat = ms._rgb(hue, rng.uniform(0.35, 0.75), rng.uniform(0.55, 0.85))
    fur = coat * (1 + 0.22 * _fur(rng, width, height)[..., None] + 0.08 * _octaves(rng, width, height, 1, falloff=0.6))
    face = ImageDraw.Draw(features := Image.new("L", (width, height), 0))
    for u, v, r in ((0.34, 0.5, 0.07), (0.66, 0.5, 0.07), (0.5, 0.72, 0.06)):  # eyes, nose
        cx, cy, radius = box[0] + u * (box[2] - box[0]), box[1] + v * (box[3] - box[1]), r * (box[2] - box[0])
        face.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=255)
    fur *= 1 - 0.8 * (np.asarray(features, np.float32) / 255)[..., None]
    alpha = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.GaussianBlur(1.5)),
                       np.float32)[..., None] / 255
    pixels = pixels * (1 - alpha) + fur * alpha
    texture = _octaves(rng, width, height, 1, falloff=-0.5)
    pixels *= 1 + DETAIL * texture / texture.std()
    pixels = pixels * 255 + rng.normal(0, GRAIN, (height, width, 1))
    picture = Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))

    shape = Image.fromarray(mask.astype(np.uint8) * 255)
    trimap = np.full(mask.shape, 2, np.uint8)  # the real trimaps: 1 pet, 2 background, 3 border
    trimap[np.asarray(shape.filter(ImageFilter.MaxFilter(5))) > 0] = 3
    trimap[np.asarray(shape.filter(ImageFilter.MinFilter(5))) > 0] = 1
    return picture, Image.fromarray(trimap), box


def dataset_files(per_breed: int, test_per_breed: int) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """The contents of the images and the annotations archive: path -> bytes."""
    images: dict[str, bytes] = {}
    annotations: dict[str, bytes] = {}
    lines: dict[str, list[str]] = {"list": [], "trainval": [], "test": []}
    no_xml = set(ms.QUIRKS.get("no_xml", ()))
    for image, split in rows(per_breed, test_per_breed):
        breed = ms.split_name(image)[0]
        picture, trimap, box = render(image)
        images[f"images/{image}.jpg"] = ms.encode(image, picture)
        png = io.BytesIO()
        trimap.save(png, "PNG")
        annotations[f"annotations/trimaps/{image}.png"] = png.getvalue()
        if split == "trainval" and image not in no_xml:
            annotations[f"annotations/xmls/{image}.xml"] = ms.voc_xml(image, *picture.size, box)
        row = f"{image} {ms.class_id(breed)} {1 if ms.is_cat(breed) else 2} {ms.breed_id(breed)}\n"
        lines["list"].append(row)
        lines[split].append(row)
    annotations["annotations/list.txt"] = (ms.LIST_HEADER + "".join(lines["list"])).encode()
    annotations["annotations/trainval.txt"] = "".join(lines["trainval"]).encode()
    annotations["annotations/test.txt"] = "".join(lines["test"]).encode()
    sample_images, sample_annotations = ms.dataset_files()
    for path in quirk_files():
        (images if path.startswith("images/") else annotations)[path] = {**sample_images, **sample_annotations}[path]
    return images, annotations


def write_archives(out: Path, per_breed: int = 8, test_per_breed: int = 2) -> dict[str, dict]:
    """Write ``images.tar.gz`` and ``annotations.tar.gz`` into ``out``: name -> path, size, sha256, counts."""
    images, annotations = dataset_files(per_breed, test_per_breed)
    quirks = set(quirk_images())
    jpegs = [images[f"images/{image}.jpg"] for image, _ in rows(per_breed, test_per_breed) if image not in quirks]
    written = {}
    for name, files in (("images", images), ("annotations", annotations)):
        data = ms.tar_gz(files)
        path = Path(out) / f"{name}.tar.gz"
        atomic_write_bytes(path, data)
        written[name] = {"path": path, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                         "members": len(files)}
    written["images"].update(jpegs=len(jpegs), mean_jpeg_bytes=sum(map(len, jpegs)) / len(jpegs),
                             listed=len(rows(per_breed, test_per_breed)))
    return written


def describe(written: dict[str, dict]) -> str:
    im = written["images"]
    per_image = im["size"] / im["listed"]
    return (f"Pets-like archives: {im['listed']} listed images ({im['jpegs']} plain JPEGs, mean "
            f"{im['mean_jpeg_bytes'] / 1e3:.0f} KB; {per_image / 1e3:.0f} KB of images.tar.gz per image vs "
            f"{REAL_IMAGES_BYTES / REAL_IMAGE_COUNT / 1e3:.0f} KB in the real one), quirk kinds "
            f"{', '.join(ms.QUIRKS)}; images.tar.gz {im['size'] / 1e6:.1f} MB, "
            f"annotations.tar.gz {written['annotations']['size'] / 1e6:.1f} MB")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--per-breed", type=int, default=8, help="trainval images per breed")
    parser.add_argument("--test-per-breed", type=int, default=2, help="test images per breed")
    args = parser.parse_args(argv)
    written = write_archives(args.out, args.per_breed, args.test_per_breed)
    print(describe(written))
    for item in written.values():
        print(f"{item['path']}  size: {item['size']}  sha256: {item['sha256']}")


if __name__ == "__main__":
    main()
