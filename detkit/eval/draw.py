"""Draw labelled boxes on an image: eval's sample images and the predict/invoke clients."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

PREDICTED = (255, 64, 64)
TRUE = (64, 220, 64)


@dataclass(frozen=True)
class Boxes:
    """Normalised ``[ymin, xmin, ymax, xmax]`` boxes of one colour, a text label each.

    ``thin``: half the line width, so a box drawn over another at the same place leaves the one
    below visible along its inner side (eval draws the true boxes thin over the predictions)."""

    boxes: Sequence[Sequence[float]]
    labels: Sequence[str]
    color: tuple[int, int, int]
    label_below: bool = False
    thin: bool = False


def draw_boxes(image: Image.Image, *layers: Boxes) -> Image.Image:
    """Draw ``layers`` in place, later layers over earlier ones.

    Every label first, then every outline, so no label (a filled tag over its box's edge) hides
    another box's outline, whatever the boxes' overlap."""
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    width, height = image.size
    line = max(2, round(min(width, height) / 150))
    for layer in layers:
        for (ymin, xmin, ymax, _), label in zip(layer.boxes, layer.labels):
            left, top, bottom = xmin * width, ymin * height, ymax * height
            text_box = draw.textbbox((0, 0), label, font=font)
            text_w, text_h = text_box[2] - text_box[0] + 4, text_box[3] - text_box[1] + 4
            y = min(bottom, height - text_h) if layer.label_below else max(top - text_h, 0)
            draw.rectangle([left, y, left + text_w, y + text_h], fill=layer.color)
            draw.text((left + 2, y + 1), label, fill=(0, 0, 0), font=font)
    for layer in layers:
        for ymin, xmin, ymax, xmax in layer.boxes:
            draw.rectangle([xmin * width, ymin * height, xmax * width, ymax * height], outline=layer.color,
                           width=line // 2 if layer.thin else line)
    return image


def detection_labels(classes: Sequence[float], scores: Sequence[float], label_map: dict[int, str]) -> list[str]:
    return [f"{label_map.get(int(c), f'id {int(c)}')} {s:.2f}" for c, s in zip(classes, scores)]
