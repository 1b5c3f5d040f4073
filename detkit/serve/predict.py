"""Send an image to the served model as a TF Serving REST request (docs/export.md), print the top detections with class
names and write a copy of the image with the boxes drawn.

The request is TF Serving's REST predict body (docs/export.md): ``{"signature_name": "serving_default",
"instances": [{"inputs": {"b64": ...}}]}``, posted as JSON to TF Serving's ``:predict`` or to
the container's ``/invocations`` (``make predict``), or sent with boto3's
``sagemaker-runtime invoke_endpoint`` (``make invoke``, ``detkit.cloud.deploy``).

    python -m detkit.serve.predict IMAGE [--url http://127.0.0.1:8080/invocations] \
        [--export models/export/pet_object_detection] [--out IMAGE_detections.png] [KEY=VALUE ...]

The classes are named by the newest label map under ``--export`` (default: the configured model's
export folder, ``models/export/<export.model_name>``), or by ``--label-map``.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from detkit.config.cli import command_parser, export_folder, fail, load, run_command
from detkit.core.fsio import EXPORT_LABEL_MAP, atomic_write_bytes, newest_version
from detkit.data.labelmap import LabelMapError, read_label_map
from detkit.eval.draw import PREDICTED, Boxes, detection_labels, draw_boxes

DEFAULT_URL = "http://127.0.0.1:8080/invocations"
DEFAULT_TOP, DEFAULT_MIN_SCORE = 5, 0.3  # detections printed and drawn, and the lowest score among them


class PredictError(RuntimeError):
    """The server refused the request, or answered something that is not a prediction."""


def request_body(images: list[bytes]) -> str:
    """The REST predict body, one instance per image."""
    instances = [{"inputs": {"b64": base64.b64encode(image).decode("ascii")}} for image in images]
    return json.dumps({"signature_name": "serving_default", "instances": instances})


def post_json(url: str, body: str, timeout_s: float = 60.0) -> dict[str, Any]:
    import requests

    try:
        response = requests.post(url, data=body, headers={"content-type": "application/json"}, timeout=timeout_s)
    except requests.RequestException as exc:
        raise PredictError(f"{url}: {exc}") from exc
    return parse_response(url, response.status_code, response.content)


def parse_response(source: str, status: int, content: bytes) -> dict[str, Any]:
    try:
        answer = json.loads(content)
    except ValueError:
        raise PredictError(f"{source}: HTTP {status}, not JSON: {content[:200]!r}") from None
    if status != 200 or "error" in answer:
        raise PredictError(f"{source}: HTTP {status}: {answer.get('error', answer)}")
    if not isinstance(answer.get("predictions"), list):
        raise PredictError(f"{source}: the answer has no 'predictions' list: {str(answer)[:200]}")
    return answer


def top_detections(prediction: dict[str, Any], label_map: dict[int, str], top: int,
                   min_score: float) -> list[dict[str, Any]]:
    """The best ``top`` detections scoring at least ``min_score``, named by the label map."""
    count = int(prediction["num_detections"])
    found = []
    for box, cls, score in zip(prediction["detection_boxes"][:count], prediction["detection_classes"][:count],
                               prediction["detection_scores"][:count]):
        if score >= min_score and len(found) < top:
            found.append({"class": label_map.get(int(cls), f"id {int(cls)}"), "id": int(cls), "score": score,
                          "box": box})
    return found


def label_map_of(export: Path) -> dict[int, str]:
    """The label map of the newest version under an export folder (``<base>/<model_name>``)."""
    version = newest_version(export)
    if version is None:
        raise PredictError(f"{export}: no exported version (run the export stage, or pass --label-map)")
    return read_label_map(version / EXPORT_LABEL_MAP)


def draw_detections(image_bytes: bytes, prediction: dict[str, Any], label_map: dict[int, str], out: Path,
                    top: int, min_score: float) -> list[dict[str, Any]]:
    """Write the image with its top detections drawn to ``out`` (PNG, atomically); returns those detections.

    One prediction in the REST answer's form (``{"detection_boxes": ..., ...}``): what `make predict`,
    `make invoke` and `make batch --draw` draw.
    """
    found = top_detections(prediction, label_map, top, min_score)
    image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    labels = detection_labels([d["id"] for d in found], [d["score"] for d in found], label_map)
    draw_boxes(image, Boxes([d["box"] for d in found], labels, PREDICTED))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(out, buffer.getvalue())
    return found


def report(image_path: Path, image_bytes: bytes, prediction: dict[str, Any], label_map: dict[int, str], out: Path,
           top: int, min_score: float) -> list[dict[str, Any]]:
    """Print the top detections and write the image with them drawn to ``out``."""
    found = draw_detections(image_bytes, prediction, label_map, out, top, min_score)
    print(f"{image_path}: {int(prediction['num_detections'])} detections, "
          f"{len(found)} with score >= {min_score}:")
    for d in found:
        ymin, xmin, ymax, xmax = d["box"]
        print(f"  {d['class']:<28} {d['score']:.3f}  box (ymin, xmin, ymax, xmax) "
              f"{ymin:.3f} {xmin:.3f} {ymax:.3f} {xmax:.3f}")
    print(f"wrote {out}")
    return found


def client_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that `make predict` and `make invoke` share."""
    parser.add_argument("image", type=Path, help="a JPEG, PNG or GIF file")
    parser.add_argument("--export", type=Path, help="export folder <base>/<model_name>: its newest label map "
                                                    "(default: models/export/<export.model_name>)")
    parser.add_argument("--label-map", type=Path, help="label_map.pbtxt (instead of --export)")
    parser.add_argument("--out", type=Path, help="image with boxes to write (default: <image>_detections.png)")
    parser.add_argument("--top", type=int, default=DEFAULT_TOP, help="detections to print and draw")
    parser.add_argument("--min-score", type=float, default=DEFAULT_MIN_SCORE, help="lowest score printed and drawn")


def run_client(args: argparse.Namespace, send: Callable[[str], dict[str, Any]]) -> int:
    """Read the image, ``send`` the REST body, report. Exit status for ``main``."""
    try:
        data = args.image.read_bytes()
        Image.open(io.BytesIO(data)).verify()
        label_map = (read_label_map(args.label_map) if args.label_map
                     else label_map_of(args.export) if args.export else {})
        answer = send(request_body([data]))
        out = args.out or args.image.with_name(f"{args.image.stem}_detections.png")
        report(args.image, data, answer["predictions"][0], label_map, out, args.top, args.min_score)
    except (UnidentifiedImageError, SyntaxError):  # before OSError: Pillow's "not an image" is one
        return fail(f"{args.image}: not an image file")
    except OSError as exc:
        return fail(f"{args.image}: {exc}")
    except (PredictError, LabelMapError) as exc:
        return fail(exc)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("detkit.serve.predict", __doc__)
    client_arguments(parser)
    parser.add_argument("--url", default=DEFAULT_URL, help=f"/invocations or :predict URL (default {DEFAULT_URL})")

    def predict(args: argparse.Namespace) -> int:
        if args.overrides or not (args.export or args.label_map):  # the config only where it has a say
            args.export = args.export or export_folder(load(args))
        return run_client(args, lambda body: post_json(args.url, body))

    return run_command(parser, argv, predict)


if __name__ == "__main__":
    sys.exit(main())
