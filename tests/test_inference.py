"""serving/inference.py, the handler AWS's TF Serving images load from model.tar.gz's code/: its
input_handler's bodies go to the TF Serving stand-in's :predict, as that image posts them, and
output_handler gets the real answers back."""

from __future__ import annotations

import importlib.util
import io
import json
from types import SimpleNamespace

import pytest
import requests

from detkit.serve.predict import request_body
from harness.serving import REPO_ROOT

pytestmark = pytest.mark.slow


def load_handler():
    # serving/ is no package: the AWS image, too, loads the file by path.
    spec = importlib.util.spec_from_file_location("inference", REPO_ROOT / "serving" / "inference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


inference = load_handler()


def context(content_type: str | None) -> SimpleNamespace:
    """The fields of the image's Context that the handlers read."""
    return SimpleNamespace(request_content_type=content_type, accept_header="application/json")


def through_tf_serving(served, body: bytes, content_type: str) -> tuple[bytes, str]:
    """What the AWS image does with a request: input_handler, POST to :predict, output_handler."""
    ctx = context(content_type)
    predict_body = inference.input_handler(io.BytesIO(body), ctx)
    return inference.output_handler(requests.post(f"{served.tfs_url}:predict", data=predict_body, timeout=60), ctx)


def test_a_raw_image_and_its_json_form_get_the_same_predictions(served, val_examples):
    image = val_examples[0]["encoded"]
    json_body = request_body([image]).encode()
    assert inference.input_handler(io.BytesIO(json_body), context("application/json; charset=utf-8")) == json_body
    from_json, accept = through_tf_serving(served, json_body, "application/json")
    assert accept == "application/json"
    predictions = json.loads(from_json)["predictions"]
    assert predictions[0]["num_detections"] > 0
    for content_type in ("image/jpeg", "application/x-image"):
        answer, _ = through_tf_serving(served, image, content_type)
        assert json.loads(answer)["predictions"] == predictions, content_type


@pytest.mark.parametrize("content_type", ["text/csv", None])
def test_an_unsupported_content_type_raises_naming_it(content_type):
    with pytest.raises(ValueError, match=f"unsupported Content-Type {content_type!r}: send application/json"):
        inference.input_handler(io.BytesIO(b"1,2,3"), context(content_type))


def test_a_tf_serving_error_is_raised_with_its_message(served):
    with pytest.raises(ValueError, match=r'TF Serving answered 400: \{"error": "Unknown image file format'):
        through_tf_serving(served, b"not an image", "image/png")
