"""Request handlers for AWS's prebuilt TensorFlow Serving inference images
(github.com/aws/sagemaker-tensorflow-serving-container), which load ``code/inference.py`` from
the model archive (the package stage puts this file there). They make those images take what
this project's own container takes on /invocations (serving/invocations.js):

- ``application/json`` (any ``charset``): TF Serving's predict body, sent on unchanged;
- ``image/jpeg``, ``image/png``, ``image/gif``, ``application/x-image``: the image file itself,
  sent as the predict body of one instance, so the answer is that of the JSON form.

The image calls ``input_handler(data, context)`` with the request body (a stream) and a context
whose ``request_content_type`` and ``accept_header`` are the request's headers, posts what it
returns to TF Serving's ``:predict`` and hands TF Serving's response to ``output_handler``. A
ValueError from either becomes the image's error answer. Standard library only: that image
installs nothing else unless the archive has a ``code/requirements.txt``.
"""

from __future__ import annotations

import base64
import json

JSON_TYPE = "application/json"
IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "application/x-image")


def media_type(content_type: str | None) -> str:
    """``"Application/JSON; charset=utf-8"`` -> ``"application/json"``."""
    return (content_type or "").split(";")[0].strip().lower()


def input_handler(data, context) -> bytes | str:
    """The TF Serving predict body for this request's body (a stream, or bytes)."""
    body = data.read() if hasattr(data, "read") else data
    content_type = media_type(context.request_content_type)
    if content_type == JSON_TYPE:
        return body
    if content_type not in IMAGE_TYPES:
        raise ValueError(f"unsupported Content-Type {context.request_content_type!r}: send {JSON_TYPE} "
                         f"(the TF Serving predict body) or an image with Content-Type {', '.join(IMAGE_TYPES)}")
    if not body:
        raise ValueError(f"empty body: send the image file's bytes (Content-Type {content_type})")
    return json.dumps({"signature_name": "serving_default",
                       "instances": [{"inputs": {"b64": base64.b64encode(body).decode("ascii")}}]})


def output_handler(data, context) -> tuple[bytes, str]:
    """TF Serving's answer as it is, or its error (status and ``{"error": ...}`` text) raised."""
    if data.status_code != 200:
        raise ValueError(f"TF Serving answered {data.status_code}: {data.content.decode('utf-8', 'replace')}")
    return data.content, context.accept_header
