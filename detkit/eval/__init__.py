"""Evaluation: COCO metrics over a split (``coco``) and drawing boxes on images (``draw``)."""
