"""Draw labelled boxes on an image: eval's sample images and the predict/invoke clients."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

PREDICTED = (255, 64, 64)
TRUE = (64, 220, 64)


def draw_boxes(
    image: Image.Image,
    boxes: Sequence[Sequence[float]],
    labels: Sequence[str],
    color: tuple[int, int, int],
    label_below: bool = False,
) -> Image.Image:
    """Draw normalised ``[ymin, xmin, ymax, xmax]`` boxes with a text label each, in place."""
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    width, height = image.size
    line = max(1, round(min(width, height) / 150))
    for (ymin, xmin, ymax, xmax), label in zip(boxes, labels):
        left, top, right, bottom = xmin * width, ymin * height, xmax * width, ymax * height
        draw.rectangle([left, top, right, bottom], outline=color, width=line)
        text_box = draw.textbbox((0, 0), label, font=font)
        text_w, text_h = text_box[2] - text_box[0] + 4, text_box[3] - text_box[1] + 4
        y = min(bottom, height - text_h) if label_below else max(top - text_h, 0)
        draw.rectangle([left, y, left + text_w, y + text_h], fill=color)
        draw.text((left + 2, y + 1), label, fill=(0, 0, 0), font=font)
    return image


def detection_labels(classes: Sequence[float], scores: Sequence[float], label_map: dict[int, str]) -> list[str]:
    return [f"{label_map.get(int(c), f'id {int(c)}')} {s:.2f}" for c, s in zip(classes, scores)]
