"""Where a drawn image's boxes are: each box's outline in its colour at the box's place, and no
change anywhere else than the outlines and their labels. Boxes are normalised
[ymin, xmin, ymax, xmax], as the export answers them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

BAND = 2  # px either side of an edge's place: rounding, and a line drawn inward from it
LABEL = (30, 300)  # px: the height either side of a label's edge, and the width from the box's left, a label may take


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def corners(box: Sequence[float], height: int, width: int) -> tuple[int, int, int, int]:
    ymin, xmin, ymax, xmax = box
    clip = lambda v, size: int(min(max(round(v * size), 0), size - 1))  # noqa: E731
    return clip(ymin, height), clip(xmin, width), clip(ymax, height), clip(xmax, width)


def outline_share(drawn: Image.Image, box: Sequence[float], colors: Sequence[tuple[int, int, int]]) -> float:
    """Share of the points along ``box``'s four edges with a pixel of one of ``colors`` within ``BAND``."""
    a = pixels(drawn)
    height, width = a.shape[:2]
    match = np.zeros((height, width), bool)
    for color in colors:
        match |= np.all(a == color, axis=-1)
    top, left, bottom, right = corners(box, height, width)
    hits = []
    for y in (top, bottom):
        rows = slice(max(y - BAND, 0), y + BAND + 1)
        hits += [match[rows, x].any() for x in range(left + BAND, right - BAND)]
    for x in (left, right):
        columns = slice(max(x - BAND, 0), x + BAND + 1)
        hits += [match[y, columns].any() for y in range(top + BAND, bottom - BAND)]
    assert hits, f"box {box} is too small to check"
    return float(np.mean(hits))


def changed_elsewhere(original: Image.Image, drawn: Image.Image, boxes: Sequence[Sequence[float]],
                      label_below: bool = False) -> int:
    """Pixels that differ from ``original`` away from every box's outline and label."""
    before, after = pixels(original), pixels(drawn)
    assert before.shape == after.shape
    height, width = before.shape[:2]
    allowed = np.zeros((height, width), bool)
    for box in boxes:
        top, left, bottom, right = corners(box, height, width)
        ring = np.zeros_like(allowed)
        margin = BAND + max(1, round(min(width, height) / 150))
        ring[max(top - margin, 0):bottom + margin + 1, max(left - margin, 0):right + margin + 1] = True
        ring[top + margin:bottom - margin, left + margin:right - margin] = False
        edge = bottom if label_below else top
        ring[max(edge - LABEL[0], 0):edge + LABEL[0], max(left - margin, 0):left + LABEL[1]] = True
        allowed |= ring
    return int(np.sum(np.any(before != after, axis=-1) & ~allowed))
