"""Generate the embedded sample dataset: a small synthetic dataset in the exact Oxford-IIIT Pet layout.

``python sample/make_sample.py --out sample/`` writes ``images.tar.gz`` and ``annotations.tar.gz``
and prints their sizes and sha256 digests, which ``conf/dataset/sample.yaml`` pins. The output
is byte-identical on every run (fixed seeds, sorted tar members, fixed tar and gzip metadata), so
the committed archives can always be checked against this script (``tests/test_make_sample.py``).

Layout (as in the real archives)
--------------------------------
``images/<Breed>_<n>.jpg``; ``annotations/list.txt`` (the real six ``#`` header lines, then rows
``<image> <class_id 1..37> <species 1=cat 2=dog> <breed_id within species>``);
``annotations/trainval.txt`` and ``annotations/test.txt`` (same rows, no header);
``annotations/xmls/<image>.xml`` (Pascal VOC head box, trainval rows only); and
``annotations/trimaps/<image>.png`` (mode L: 1 pet, 2 background, 3 border) for every listed image.
Each of the 37 classes has 12 trainval images (n = 1..12) and 3 test images (n = 13..15).

Box coordinates are pixel edges: ``xmin`` is the first object column, ``xmax`` one past the last,
so ``xmin / width`` .. ``xmax / width`` (as the TF OD API pets converter reads them) is exactly the
object's tight box.

Visual scheme
-------------
The demo trains a tiny RetinaNet from scratch at 128x128 px for a few minutes on 2 CPU cores, so
the class has to be readable from coarse colour and layout, not fine detail:

* Each class owns one (fill hue, pattern) pair: the class at 0-based index ``i`` gets hue
  ``HUES[i % 8]`` and pattern ``PATTERNS[i // 8]``. Eight hues about 45 degrees apart rather than
  ~13 hues ~28 degrees apart: neighbouring saturated hues (cyan/azure, blue/violet) run together
  once downscaled and chroma-subsampled by JPEG, so a fifth pattern buys the missing combinations.
* Patterns (solid, horizontal stripes, vertical stripes, checker, central spot) are drawn in units
  of the object's own box, so a small head shows the same few bold periods as a large one (bands
  stay ~4 px wide at 128 px even for the smallest heads). Stripes are horizontal or vertical, never
  diagonal, so a horizontal flip during training keeps the class's look. The pattern is a dark
  shade of the fill hue, so the hue is readable everywhere on the head.
* The background is low-saturation, low-frequency noise: never confusable with a saturated fill,
  and smooth enough to keep the JPEGs small.
* Within a class only the brightness varies (a few percent), besides image size, head size and
  position. Cats have pointed ears on top, dogs floppy ears at the sides.

Quirks
------
``QUIRKS`` lists the files that reproduce the real archives' traps on purpose (GIF, PNG and RGBA
bytes behind ``.jpg``, grayscale and CMYK JPEGs, a truncated and an undecodable JPEG, a JPEG that
decodes but makes libjpeg warn about junk bytes before its end marker, trainval rows without XML,
a box reaching past the image, stray ``.mat`` files, macOS AppleDouble files).
"""

from __future__ import annotations

import argparse
import colorsys
import gzip
import hashlib
import io
import os
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# The Pets label map order (TF OD API pet_label_map.pbtxt): ids 1..37, case-insensitive
# alphabetical; a capitalised name is a cat breed, a lower-case one a dog breed.
CLASSES = (
    "Abyssinian", "american_bulldog", "american_pit_bull_terrier", "basset_hound", "beagle",
    "Bengal", "Birman", "Bombay", "boxer", "British_Shorthair", "chihuahua", "Egyptian_Mau",
    "english_cocker_spaniel", "english_setter", "german_shorthaired", "great_pyrenees", "havanese",
    "japanese_chin", "keeshond", "leonberger", "Maine_Coon", "miniature_pinscher", "newfoundland",
    "Persian", "pomeranian", "pug", "Ragdoll", "Russian_Blue", "saint_bernard", "samoyed",
    "scottish_terrier", "shiba_inu", "Siamese", "Sphynx", "staffordshire_bull_terrier",
    "wheaten_terrier", "yorkshire_terrier",
)  # fmt: skip

# kind -> image names without extension; "stray" names carry their own extension and
# "appledouble" gives paths inside the archives, since those files are not dataset images.
QUIRKS: dict[str, list[str]] = {
    "gif": ["Abyssinian_34", "Egyptian_Mau_139"],
    "png": ["Bengal_11"],
    "rgba": ["Abyssinian_5"],
    "grayscale": ["Bombay_3"],
    "cmyk": ["Birman_4"],
    "truncated": ["beagle_116"],
    "corrupt": ["chihuahua_121"],
    "dirty": ["Egyptian_Mau_145"],
    "no_xml": ["Persian_2", "pug_7"],
    "box_outside": ["pug_6"],
    "stray": ["Abyssinian_100.mat", "Abyssinian_101.mat", "Abyssinian_102.mat"],
    "appledouble": ["images/._Abyssinian_1.jpg", "annotations/trimaps/._Abyssinian_1.png"],
}

# Images beyond n = 1..15 that exist only to carry a quirk; they are trainval rows with an XML.
EXTRA_TRAINVAL = QUIRKS["gif"] + QUIRKS["truncated"] + QUIRKS["corrupt"] + QUIRKS["dirty"]

LIST_HEADER = (
    "#Image CLASS-ID SPECIES BREED ID\n"
    "#ID: 1:37 Class ids\n"
    "#SPECIES: 1:Cat 2:Dog\n"
    "#BREED ID: 1-25:Cat 1:12:Dog\n"
    "#All images with 1st letter as captial are cat images\n"
    "#images with small first letter are dog images\n"
)  # verbatim from the real list.txt, typos included

SEED = 20120618
TRAINVAL_N = range(1, 13)
TEST_N = range(13, 16)
SIDE_PX = (160, 288)  # inclusive range of each image side
HEAD_FRACTION = (0.30, 0.65)  # head box's longer side, as a share of the image's shorter side
JPEG_QUALITY = 85
TAR_MTIME = 1339977600  # any fixed time keeps the archives reproducible; this is 2012-06-18

HUES = (0, 30, 58, 120, 180, 225, 275, 320)  # degrees: red orange yellow green cyan blue violet magenta
PATTERNS = ("solid", "hstripes", "vstripes", "checker", "spot")

APPLEDOUBLE = (
    b"\x00\x05\x16\x07"  # AppleDouble magic
    + b"\x00\x02\x00\x00"  # version 2
    + b"Mac OS X        "  # filler
    + b"\x00\x02"  # two entries: Finder info (id 9, 32 bytes at 50) and an empty resource fork
    + b"\x00\x00\x00\x09\x00\x00\x00\x32\x00\x00\x00\x20"
    + b"\x00\x00\x00\x02\x00\x00\x00\x52\x00\x00\x00\x00"
    + bytes(32)
)

_QUIRK_OF = {name: kind for kind, names in QUIRKS.items() for name in names}


def class_id(breed: str) -> int:
    return CLASSES.index(breed) + 1


def is_cat(breed: str) -> bool:
    return breed[0].isupper()


def breed_id(breed: str) -> int:
    """1-based position of the breed among the breeds of its own species."""
    return [b for b in CLASSES if is_cat(b) == is_cat(breed)].index(breed) + 1


def split_name(image: str) -> tuple[str, int]:
    """``"Egyptian_Mau_139"`` -> ``("Egyptian_Mau", 139)``."""
    breed, n = image.rsplit("_", 1)
    return breed, int(n)


def style(breed: str) -> tuple[int, str]:
    """The class's (hue in degrees, pattern): see the module docstring."""
    i = class_id(breed) - 1
    return HUES[i % len(HUES)], PATTERNS[i // len(HUES)]


def rows() -> list[tuple[str, str]]:
    """(image, split) for every listed image, ordered by class id, then n."""
    listed = [(f"{b}_{n}", "trainval") for b in CLASSES for n in TRAINVAL_N]
    listed += [(f"{b}_{n}", "test") for b in CLASSES for n in TEST_N]
    listed += [(name, "trainval") for name in EXTRA_TRAINVAL]
    return sorted(listed, key=lambda row: (class_id(split_name(row[0])[0]), split_name(row[0])[1]))


def _rgb(hue_deg: float, sat: float, val: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(hue_deg / 360.0, sat, val), dtype=np.float32)


def _smooth_noise(rng: np.random.Generator, width: int, height: int, cells: int) -> np.ndarray:
    """Noise of roughly unit amplitude that varies over ``size / cells`` pixels."""
    grid = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    return np.asarray(Image.fromarray(grid).resize((width, height), Image.Resampling.BICUBIC))


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    base = _rgb(rng.uniform(0, 360), rng.uniform(0.03, 0.12), rng.uniform(0.45, 0.8))
    shade = 1 + 0.12 * _smooth_noise(rng, width, height, 4) + 0.05 * _smooth_noise(rng, width, height, 16)
    return base * shade[..., None]


def _head_mask(width: int, height: int, x0: int, y0: int, size_x: int, size_y: int, cat: bool) -> np.ndarray:
    """Face ellipse plus ears, drawn inside the given box (unit coordinates scaled to it)."""
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)

    def px(u: float, v: float) -> tuple[float, float]:
        return x0 + u * (size_x - 1), y0 + v * (size_y - 1)

    if cat:
        draw.ellipse([px(0.0, 0.3), px(1.0, 1.0)], fill=255)
        draw.polygon([px(0.02, 0.62), px(0.14, 0.0), px(0.48, 0.36)], fill=255)
        draw.polygon([px(0.98, 0.62), px(0.86, 0.0), px(0.52, 0.36)], fill=255)
    else:
        draw.ellipse([px(0.14, 0.0), px(0.86, 1.0)], fill=255)
        draw.ellipse([px(0.0, 0.08), px(0.3, 0.78)], fill=255)
        draw.ellipse([px(0.7, 0.08), px(1.0, 0.78)], fill=255)
    return np.asarray(mask) > 0


def _pattern(pattern: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Where the dark shade goes, from coordinates in units of the head box (0..1)."""
    if pattern == "solid":
        return np.zeros(u.shape, dtype=bool)
    if pattern == "hstripes":
        return np.floor(v * 5) % 2 == 1
    if pattern == "vstripes":
        return np.floor(u * 5) % 2 == 1
    if pattern == "checker":
        return (np.floor(u * 4) + np.floor(v * 4)) % 2 == 1
    if pattern == "spot":
        return (u - 0.5) ** 2 + (v - 0.62) ** 2 < 0.24**2
    raise ValueError(f"unknown pattern {pattern!r}")


def render(image: str) -> tuple[Image.Image, Image.Image, tuple[int, int, int, int]]:
    """The RGB picture, its trimap and the head's tight box (xmin, ymin, xmax, ymax) in pixel edges.

    Each image has its own random stream, seeded by its class id and number, so adding or removing
    an image leaves every other one unchanged.
    """
    breed, n = split_name(image)
    rng = np.random.default_rng([SEED, class_id(breed), n])
    hue, pattern = style(breed)
    width, height = (int(side) for side in rng.integers(SIDE_PX[0], SIDE_PX[1] + 1, size=2))
    pixels = _background(rng, width, height)

    longer = rng.uniform(*HEAD_FRACTION) * min(width, height)
    aspect = rng.uniform(0.9, 1.1)
    size_x, size_y = round(longer * min(1.0, aspect)), round(longer * min(1.0, 1 / aspect))
    x0, y0 = int(rng.integers(0, width - size_x + 1)), int(rng.integers(0, height - size_y + 1))
    if _QUIRK_OF.get(image) == "box_outside":
        # The head touches the top and right edges, so clipping the XML box recovers it exactly.
        x0, y0 = width - size_x, 0
    mask = _head_mask(width, height, x0, y0, size_x, size_y, is_cat(breed))
    box = Image.fromarray(mask).getbbox()
    assert box is not None

    xs, ys = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    dark = _pattern(pattern, (xs - box[0]) / (box[2] - box[0]), (ys - box[1]) / (box[3] - box[1]))
    brightness = rng.uniform(0.9, 1.0)
    fill, deep = _rgb(hue, 0.95, 0.95 * brightness), _rgb(hue, 0.95, 0.38 * brightness)
    pixels[mask] = np.where(dark[mask][:, None], deep, fill)
    picture = Image.fromarray(np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8))

    shape = Image.fromarray(mask.astype(np.uint8) * 255)
    inside = np.asarray(shape.filter(ImageFilter.MinFilter(5))) > 0
    near = np.asarray(shape.filter(ImageFilter.MaxFilter(5))) > 0
    trimap = np.full(mask.shape, 2, dtype=np.uint8)
    trimap[near] = 3
    trimap[inside] = 1
    return picture, Image.fromarray(trimap), box


def encode(image: str, picture: Image.Image) -> bytes:
    """The bytes stored as ``images/<image>.jpg``: a JPEG, or the image's quirk."""
    kind = _QUIRK_OF.get(image)
    if kind == "corrupt":
        # A JPEG start-of-image marker and then noise that no decoder can read; the noise has its
        # own stream so that render()'s stream stays the same as for every other image.
        breed, n = split_name(image)
        return b"\xff\xd8" + np.random.default_rng([SEED, class_id(breed), n, 1]).bytes(4096)
    out = io.BytesIO()
    if kind == "gif":
        picture.convert("P", palette=Image.Palette.ADAPTIVE).save(out, "GIF")
    elif kind == "png":
        picture.save(out, "PNG")
    elif kind == "rgba":
        # Fully opaque, so dropping the alpha channel and compositing it give the same picture.
        picture.convert("RGBA").save(out, "PNG")
    elif kind == "grayscale":
        picture.convert("L").save(out, "JPEG", quality=JPEG_QUALITY)
    elif kind == "cmyk":
        picture.convert("CMYK").save(out, "JPEG", quality=JPEG_QUALITY)
    else:
        picture.save(out, "JPEG", quality=JPEG_QUALITY)
    data = out.getvalue()
    if kind == "dirty":
        # As in the real archive: junk between the entropy-coded data and the end-of-image marker,
        # which libjpeg skips with a "Corrupt JPEG data: N extraneous bytes" warning. No 0xFF byte,
        # so none of it reads as a marker.
        breed, n = split_name(image)
        junk = np.random.default_rng([SEED, class_id(breed), n, 1]).integers(0, 0xFF, 240, dtype=np.uint8)
        return data[:-2] + junk.tobytes() + data[-2:]
    return data[: len(data) // 2] if kind == "truncated" else data


def voc_xml(image: str, width: int, height: int, box: tuple[int, int, int, int]) -> bytes:
    """The Pets XML for one head box (one line, as in the real archive)."""
    xmin, ymin, xmax, ymax = box
    if _QUIRK_OF.get(image) == "box_outside":
        # Like a few real boxes, this one reaches past the image; consumers must clip it.
        ymin, xmax = ymin - 4, xmax + 9
    species = "cat" if is_cat(split_name(image)[0]) else "dog"
    return (
        f"<annotation><folder>OXIIIT</folder><filename>{image}.jpg</filename>"
        "<source><database>OXFORD-IIIT Pet Dataset</database><annotation>OXIIIT</annotation>"
        "<image>flickr</image></source>"
        f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"
        f"<segmented>0</segmented><object><name>{species}</name><pose>Frontal</pose>"
        "<truncated>0</truncated><occluded>0</occluded>"
        f"<bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox>"
        "<difficult>0</difficult></object></annotation>\n"
    ).encode()


def _mat_file(name: str) -> bytes:
    """A MATLAB 5 file header and filler: the real archive's stray .mat files are not images."""
    text = f"MATLAB 5.0 MAT-file, Platform: GLNXA64, Created on: Mon Jun 18 00:00:00 2012 ({name})"
    return text.encode().ljust(116, b" ") + bytes(8) + b"\x00\x01IM" + bytes(384)


def dataset_files() -> tuple[dict[str, bytes], dict[str, bytes]]:
    """The contents of the images and the annotations archive: path -> bytes."""
    images: dict[str, bytes] = {}
    annotations: dict[str, bytes] = {}
    lines: dict[str, list[str]] = {"list": [], "trainval": [], "test": []}
    for image, split in rows():
        breed = split_name(image)[0]
        picture, trimap, box = render(image)
        images[f"images/{image}.jpg"] = encode(image, picture)
        png = io.BytesIO()
        trimap.save(png, "PNG")
        annotations[f"annotations/trimaps/{image}.png"] = png.getvalue()
        if split == "trainval" and image not in QUIRKS["no_xml"]:
            annotations[f"annotations/xmls/{image}.xml"] = voc_xml(image, *picture.size, box)
        row = f"{image} {class_id(breed)} {1 if is_cat(breed) else 2} {breed_id(breed)}\n"
        lines["list"].append(row)
        lines[split].append(row)

    annotations["annotations/list.txt"] = (LIST_HEADER + "".join(lines["list"])).encode()
    annotations["annotations/trainval.txt"] = "".join(lines["trainval"]).encode()
    annotations["annotations/test.txt"] = "".join(lines["test"]).encode()
    for name in QUIRKS["stray"]:
        images[f"images/{name}"] = _mat_file(name)
    for path in QUIRKS["appledouble"]:
        (images if path.startswith("images/") else annotations)[path] = APPLEDOUBLE
    return images, annotations


def tar_gz(files: dict[str, bytes]) -> bytes:
    """A reproducible .tar.gz: sorted members with their folders, fixed owners, times and modes."""
    folders = {str(parent) + "/" for path in files for parent in Path(path).parents if str(parent) != "."}
    raw = io.BytesIO()
    # USTAR rather than the default PAX: no per-file extended headers that could vary by Python version.
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for path in sorted(folders | set(files)):
            info = tarfile.TarInfo(path)
            info.mtime = TAR_MTIME
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if path in folders:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(files[path]), 0o644
                tar.addfile(info, io.BytesIO(files[path]))
    packed = io.BytesIO()
    # GzipFile writes its own header (mtime 0, no file name, OS "unknown"), unlike zlib's, whose OS
    # byte depends on the platform.
    with gzip.GzipFile(filename="", mode="wb", fileobj=packed, compresslevel=9, mtime=0) as gz:
        gz.write(raw.getvalue())
    return packed.getvalue()


def build_archives() -> dict[str, bytes]:
    """Archive file name -> its bytes."""
    images, annotations = dataset_files()
    return {"images.tar.gz": tar_gz(images), "annotations.tar.gz": tar_gz(annotations)}


def write_archives(out_dir: Path) -> dict[str, Path]:
    """Write both archives into ``out_dir``, each atomically, so a reader never sees half a file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, data in build_archives().items():
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=out_dir)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.chmod(tmp, 0o644)
            os.replace(tmp, out_dir / name)
        except BaseException:
            os.unlink(tmp)
            raise
        written[name] = out_dir / name
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="output folder")
    args = parser.parse_args(argv)
    for path in write_archives(args.out).values():
        data = path.read_bytes()
        print(f"{path}  size: {len(data)}  sha256: {hashlib.sha256(data).hexdigest()}")
    print("If these changed, copy size and sha256 into conf/dataset/sample.yaml.")


if __name__ == "__main__":
    main()
