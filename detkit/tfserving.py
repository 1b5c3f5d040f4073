"""A local stand-in for TensorFlow Serving's REST API, for machines without Docker or the
``tensorflow_model_server`` binary. The container runs the real TF Serving; this serves the
same exported model with the same URLs, JSON and status codes, so clients, nginx
(``serving/nginx.conf.template``) and the container's entrypoint are exercised locally.

Covered (https://www.tensorflow.org/tfx/serving/api_rest):

- ``GET /v1/models/<name>[/versions/<n>]``: version status (LOADING, then AVAILABLE or END);
- ``GET /v1/models/<name>[/versions/<n>]/metadata``: the signature defs; 404 until loaded;
- ``POST /v1/models/<name>[/versions/<n>]:predict``: row (``instances``) and columnar
  (``inputs``) requests, ``{"b64": ...}`` for string inputs; errors are ``{"error": ...}``
  with 4xx.

Like TF Serving's default version policy it serves the newest version folder under
``--model_base_path``. Not covered: gRPC, classify/regress, model config files, batching
(its flags are accepted and ignored). It runs on gunicorn (threads: requests are served
concurrently; TensorFlow releases the GIL while it computes).

    python -m detkit.tfserving --rest_api_port=8501 --model_name=pet_object_detection \
        --model_base_path=models/export/pet_object_detection
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import logging
import re
import sys
import threading
from pathlib import Path
from typing import Any

from flask import Flask, Response, request

from detkit.fsio import versions

log = logging.getLogger("tfserving")

URL = re.compile(r"(?P<name>[^/:]+)(?:/versions/(?P<version>\d+))?(?:(?P<metadata>/metadata)|:(?P<verb>\w+))?")


class RequestError(Exception):
    """A request TF Serving would answer with this status and ``{"error": message}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class ServedModel:
    """The newest version under ``base_path``, loaded in the background (status LOADING
    until then, as TF Serving reports while a version loads)."""

    def __init__(self, name: str, base_path: Path):
        self.name = name
        self.base_path = Path(base_path)
        self.version: int | None = None
        self.state = "START"
        self.error = ""
        self.signatures: dict[str, Any] = {}
        self.signature_defs: dict[str, Any] = {}
        self.saved_model: Any = None  # holds the variables that the signatures use

    def load_in_background(self) -> threading.Thread:
        thread = threading.Thread(target=self._load, name=f"load-{self.name}", daemon=True)
        thread.start()
        return thread

    def _load(self) -> None:
        found = versions(self.base_path)
        if not found:
            self.state, self.error = "END", f"no version folders (1, 2, ...) under {self.base_path}"
            log.error("model %s: %s", self.name, self.error)
            return
        self.version, self.state = found[-1], "LOADING"
        path = self.base_path / str(self.version)
        try:
            import tensorflow as tf
            from google.protobuf import json_format
            from tensorflow.core.protobuf import saved_model_pb2

            loaded = tf.saved_model.load(str(path))
            proto = saved_model_pb2.SavedModel.FromString((path / "saved_model.pb").read_bytes())
        except Exception as exc:  # anything that stops TF Serving loading a version: END with its error
            self.state, self.error = "END", f"{path}: {exc}"
            log.exception("model %s version %s failed to load", self.name, self.version)
            return
        self.saved_model = loaded
        self.signatures = dict(loaded.signatures)
        self.signature_defs = {k: json_format.MessageToDict(v) for k, v in proto.meta_graphs[0].signature_def.items()}
        self.state = "AVAILABLE"
        log.info("model %s version %s AVAILABLE (signatures: %s)", self.name, self.version, ", ".join(self.signatures))

    # ------------------------------------------------------------------ requests

    def _servable(self, version: str | None) -> None:
        """Refuse requests for a version that is not the one loaded, as TF Serving words it."""
        wanted = f"Specific({self.name}, {version})" if version else f"Latest({self.name})"
        if self.state != "AVAILABLE" or (version is not None and int(version) != self.version):
            raise RequestError(404, f"Servable not found for request: {wanted}")

    def status(self, version: str | None) -> dict[str, Any]:
        if self.version is None or (version is not None and int(version) != self.version):
            raise RequestError(404, f"Could not find any versions of model {self.name}" if version is None
                               else f"Could not find version {version} of model {self.name}")
        code = "OK" if self.state != "END" else "UNKNOWN"
        return {"model_version_status": [{"version": str(self.version), "state": self.state,
                                          "status": {"error_code": code, "error_message": self.error}}]}

    def metadata(self, version: str | None) -> dict[str, Any]:
        self._servable(version)
        return {
            "model_spec": {"name": self.name, "signature_name": "", "version": str(self.version)},
            "metadata": {"signature_def": {
                "@type": "type.googleapis.com/tensorflow.serving.SignatureDefMap",
                "signature_def": self.signature_defs,
            }},
        }

    def predict(self, version: str | None, body: bytes) -> dict[str, Any]:
        self._servable(version)
        try:
            payload = json.loads(body)
        except ValueError as exc:  # also UnicodeDecodeError
            raise RequestError(400, f"JSON Parse error: {exc}") from exc
        if not isinstance(payload, dict):
            raise RequestError(400, "JSON Value is not an object: expected {\"instances\": [...]} or {\"inputs\": ...}")
        name = payload.get("signature_name", "serving_default")
        if name not in self.signatures:
            raise RequestError(400, f'Serving signature name: "{name}" not found in signature def')
        function = self.signatures[name]
        specs = function.structured_input_signature[1]
        if "instances" in payload and "inputs" in payload:
            raise RequestError(400, "Both 'instances' and 'inputs' keys are present: use one of them")
        if "instances" in payload:
            columns = _rows_to_columns(payload["instances"], specs)
        elif "inputs" in payload:
            columns = _columnar(payload["inputs"], specs)
        else:
            raise RequestError(400, "Missing 'inputs' or 'instances' key")
        outputs = _call(function, {k: _tensor(k, v, specs[k]) for k, v in columns.items()})
        if "instances" in payload:
            batch = len(next(iter(columns.values())))
            rows = [{k: v[i].tolist() for k, v in outputs.items()} for i in range(batch)]
            return {"predictions": [next(iter(r.values())) if len(r) == 1 else r for r in rows]}
        return {"outputs": {k: v.tolist() for k, v in outputs.items()}}


def _rows_to_columns(instances: Any, specs: dict[str, Any]) -> dict[str, list]:
    if not isinstance(instances, list) or not instances:
        raise RequestError(400, "'instances' must be a non-empty list, one element per input example")
    names = sorted(specs)
    columns: dict[str, list] = {name: [] for name in names}
    for i, instance in enumerate(instances):
        named = isinstance(instance, dict) and set(instance) != {"b64"}
        if not named:  # a bare value: allowed when the signature has exactly one input
            if len(names) != 1:
                raise RequestError(400, f"instances[{i}]: the signature has inputs {names}: name them in an object")
            instance = {names[0]: instance}
        if set(instance) != set(names):
            raise RequestError(400, f"instances[{i}]: has inputs {sorted(instance)}, the signature expects {names}")
        for name in names:
            columns[name].append(instance[name])
    return columns


def _columnar(inputs: Any, specs: dict[str, Any]) -> dict[str, Any]:
    names = sorted(specs)
    if not isinstance(inputs, dict) or set(inputs) == {"b64"}:
        if len(names) != 1:
            raise RequestError(400, f"'inputs': the signature has inputs {names}: give an object keyed by them")
        inputs = {names[0]: inputs}
    if set(inputs) != set(names):
        raise RequestError(400, f"'inputs': has {sorted(inputs)}, the signature expects {names}")
    return inputs


def _tensor(name: str, values: Any, spec: Any) -> Any:
    import numpy as np
    import tensorflow as tf

    if spec.dtype == tf.string:
        array = np.asarray(_strings(name, values), dtype=object)
    else:
        try:
            array = np.asarray(values, dtype=spec.dtype.as_numpy_dtype)
        except (TypeError, ValueError) as exc:
            raise RequestError(400, f"input '{name}': not a {spec.dtype.name} tensor: {exc}") from exc
    if not spec.shape.is_compatible_with(array.shape):
        raise RequestError(400, f"input '{name}': shape {list(array.shape)} does not match the signature's "
                                f"{spec.shape.as_list()}")
    return tf.constant(array, dtype=spec.dtype)


def _strings(name: str, values: Any) -> Any:
    """Nested lists of ``{"b64": ...}`` or plain strings -> the same nesting of bytes."""
    if isinstance(values, list):
        return [_strings(name, v) for v in values]
    if isinstance(values, dict) and set(values) == {"b64"} and isinstance(values["b64"], str):
        try:
            return base64.b64decode(values["b64"], validate=True)
        except binascii.Error as exc:
            raise RequestError(400, f"input '{name}': the 'b64' value is not valid base64: {exc}") from exc
    if isinstance(values, str):
        return values.encode()
    raise RequestError(400, f"input '{name}': expected a string or {{\"b64\": \"...\"}}, got {json.dumps(values)[:80]}")


def _call(function, tensors: dict[str, Any]) -> dict[str, Any]:
    import tensorflow as tf

    try:
        outputs = function(**tensors)
    except (tf.errors.InvalidArgumentError, ValueError, TypeError) as exc:
        # TF Serving answers INVALID_ARGUMENT (undecodable image, bad shape) with 400.
        raise RequestError(400, _reason(getattr(exc, "message", None) or str(exc))) from exc
    return {k: v.numpy() for k, v in outputs.items()}


def _reason(message: str) -> str:
    """The line of a TensorFlow error that says what is wrong, without graph-node noise."""
    noise = ("Graph execution error", "Detected at node", "<stack traces", "[[")
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return next((line for line in lines if not line.startswith(noise)), lines[0] if lines else "invalid argument")


def create_app(model: ServedModel) -> Flask:
    app = Flask(__name__)

    def reply(status: int, body: dict[str, Any]) -> Response:
        return Response(json.dumps(body), status=status, mimetype="application/json")

    @app.route("/v1/models/<path:rest>", methods=["GET", "POST"])
    def models(rest: str) -> Response:
        match = URL.fullmatch(rest)
        try:
            if not match or (match["verb"] and match["verb"] != "predict"):
                raise RequestError(404, f"Malformed request: {request.method} /v1/models/{rest} "
                                        "(this stand-in serves status, metadata and :predict)")
            if match["name"] != model.name:
                raise RequestError(404, f"Servable not found for request: Latest({match['name']})")
            if match["verb"]:
                if request.method != "POST":
                    raise RequestError(405, f"{request.method} on :predict: use POST")
                return reply(200, model.predict(match["version"], request.get_data()))
            if request.method != "GET":
                raise RequestError(405, f"{request.method} on model status/metadata: use GET")
            if match["metadata"]:
                return reply(200, model.metadata(match["version"]))
            return reply(200, model.status(match["version"]))
        except RequestError as exc:
            return reply(exc.status, {"error": exc.message})

    @app.errorhandler(404)
    def not_found(_) -> Response:
        return reply(404, {"error": f"Malformed request: {request.method} {request.path}"})

    return app


def serve(model: ServedModel, host: str, port: int, threads: int, timeout_s: int) -> None:
    from gunicorn.app.base import BaseApplication

    class Server(BaseApplication):
        def load_config(self):
            # One process (one copy of the model), many threads; loading starts in the worker.
            settings = {"bind": f"{host}:{port}", "workers": 1, "worker_class": "gthread", "threads": threads,
                        "timeout": timeout_s, "graceful_timeout": 10, "accesslog": "-", "loglevel": "info"}
            for key, value in settings.items():
                self.cfg.set(key, value)

        def load(self):
            model.load_in_background()
            return create_app(model)

    Server().run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m detkit.tfserving", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # tensorflow_model_server's flags, so the container's entrypoint can start either.
    parser.add_argument("--rest_api_port", type=int, default=8501)
    parser.add_argument("--model_name", required=True)
    parser.add_argument("--model_base_path", type=Path, required=True)
    parser.add_argument("--rest_api_num_threads", type=int, default=8)
    parser.add_argument("--rest_api_timeout_in_ms", type=int, default=60_000)
    parser.add_argument("--rest_api_host", default="127.0.0.1", help="stand-in only: address to bind")
    for ignored in ("--port", "--enable_batching", "--batching_parameters_file", "--tensorflow_intra_op_parallelism",
                    "--tensorflow_inter_op_parallelism"):
        parser.add_argument(ignored, nargs="?", const="true", help="accepted for compatibility, ignored here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s tfserving %(levelname)s %(message)s")
    if not args.model_base_path.is_dir():
        print(f"error: --model_base_path {args.model_base_path}: no such folder", file=sys.stderr)
        return 2
    model = ServedModel(args.model_name, args.model_base_path.resolve())
    serve(model, args.rest_api_host, args.rest_api_port, args.rest_api_num_threads,
          max(1, args.rest_api_timeout_in_ms // 1000))
    return 0


if __name__ == "__main__":
    sys.exit(main())
