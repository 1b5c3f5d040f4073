"""detkit.eval.draw: every box's outline stays visible in its colour where it is, whatever the other
boxes and labels drawn with it, and nothing changes away from the boxes and their labels."""

from __future__ import annotations

import numpy as np
from PIL import Image

from detkit.eval.draw import PREDICTED, TRUE, Boxes, draw_boxes
from tests.drawing import changed_elsewhere, outline_share


def photo(width: int = 400, height: int = 300) -> Image.Image:
    """Noise, so no drawn colour is already there."""
    pixels = np.random.default_rng(0).integers(0, 200, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_a_true_box_and_a_prediction_at_the_same_place_both_show():
    box = [0.3, 0.2, 0.8, 0.7]
    original = photo()
    drawn = draw_boxes(original.copy(), Boxes([box], ["cat 0.97"], PREDICTED),
                       Boxes([box], ["cat"], TRUE, thin=True))
    assert outline_share(drawn, box, [TRUE]) == 1.0
    assert outline_share(drawn, box, [PREDICTED]) == 1.0
    assert changed_elsewhere(original, drawn, [box]) == 0


def test_no_label_hides_another_box_outline():
    # Near duplicates, as a detector answers for one animal, and a true box among them: each label tag
    # lies across other boxes' edges (predictions' tags above their top edge, the true one's below its bottom).
    predicted = [[0.30, 0.40, 0.80, 0.55], [0.33, 0.41, 0.78, 0.56], [0.27, 0.39, 0.84, 0.54]]
    true = [[0.285, 0.405, 0.82, 0.555]]
    layers = (Boxes(predicted, ["cat 0.91", "dog 0.55", "cat 0.40"], PREDICTED),
              Boxes(true, ["cat"], TRUE, label_below=True))
    for order in (layers, layers[::-1]):
        drawn = draw_boxes(photo(), *order)
        for layer in order:
            for box in layer.boxes:  # in its own colour: only where another outline crosses it is it hidden
                assert outline_share(drawn, box, [layer.color]) >= 0.97, (layer.color, box)


def test_lines_stay_visible_on_small_images():
    box = [0.1, 0.1, 0.9, 0.9]
    drawn = draw_boxes(photo(96, 96), Boxes([box], ["cat 0.80"], PREDICTED), Boxes([box], ["cat"], TRUE, thin=True))
    assert outline_share(drawn, box, [PREDICTED]) == 1.0 and outline_share(drawn, box, [TRUE]) == 1.0
