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
``--model_base_path``. ``--enable_batching`` with ``--batching_parameters_file`` batches
concurrent :predict requests as TF Serving's batch scheduler does (``BatchScheduler``).
``--rest_api_timeout_in_ms`` is each :predict request's deadline, as TF Serving's session runs
keep it: a request still queued at its deadline is dropped (429), a running one is cancelled
between two TensorFlow ops (504), so its work stops there. Not
covered: gRPC, classify/regress, model config files; the thread-pool flags are accepted and
ignored. It runs on gunicorn (threads: requests are served concurrently; TensorFlow releases
the GIL while it computes).

    python -m detkit.serve.tfserving --rest_api_port=8501 --model_name=pet_object_detection \
        --model_base_path=models/export/pet_object_detection [KEY=VALUE ...]

Without ``--model_name`` or ``--model_base_path`` it serves the configured model, ``export.model_name``
from ``models/export/<export.model_name>``, with any config overrides applied.
"""

from __future__ import annotations

import argparse
import base64
import collections
import dataclasses
import difflib
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flask import Flask, Response, request

from detkit.config.cli import command_parser, export_folder, fail, load, run_command
from detkit.core.fsio import newest_version

log = logging.getLogger("tfserving")

URL = re.compile(r"(?P<name>[^/:]+)(?:/versions/(?P<version>\d+))?(?:(?P<metadata>/metadata)|:(?P<verb>\w+))?")


class RequestError(Exception):
    """A request TF Serving would answer with this status and ``{"error": message}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclasses.dataclass(frozen=True)
class Signature:
    """A loaded signature and what every request to it needs, worked out once at load."""

    function: Any
    specs: dict[str, Any]  # input name -> tf.TensorSpec
    batchable: bool  # every input has a free batch dimension, so requests may share a call

    @classmethod
    def of(cls, function: Any) -> Signature:
        specs = function.structured_input_signature[1]
        return cls(function, specs, all(spec.shape.rank and spec.shape[0] is None for spec in specs.values()))


class ServedModel:
    """The newest version under ``base_path``, loaded in the background (status LOADING
    until then, as TF Serving reports while a version loads)."""

    def __init__(self, name: str, base_path: Path, batching: BatchScheduler | None = None,
                 timeout_s: float | None = None):
        self.name = name
        self.base_path = Path(base_path)
        self.batching = batching
        self.timeout_s = timeout_s  # each :predict request's deadline; None: no deadline
        self.version: int | None = None
        self.state = "START"
        self.error = ""
        self.signatures: dict[str, Signature] = {}
        self.signature_defs: dict[str, Any] = {}
        self.saved_model: Any = None  # holds the variables that the signatures use

    def load_in_background(self) -> threading.Thread:
        if self.batching:
            self.batching.start()
        thread = threading.Thread(target=self._load, name=f"load-{self.name}", daemon=True)
        thread.start()
        return thread

    def _load(self) -> None:
        path = newest_version(self.base_path)
        if path is None:
            self.state, self.error = "END", f"no version folders (1, 2, ...) under {self.base_path}"
            log.error("model %s: %s", self.name, self.error)
            return
        self.version, self.state = int(path.name), "LOADING"
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
        self.signatures = {name: Signature.of(function) for name, function in loaded.signatures.items()}
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
        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
        self._servable(version)
        try:
            payload = json.loads(body)
        except ValueError as exc:  # also UnicodeDecodeError, and integers of more than 4300 digits
            raise RequestError(400, f"JSON Parse error: {exc}") from exc
        except RecursionError as exc:  # json's parser recurses once per [ or {
            raise RequestError(400, "JSON Parse error: arrays or objects nested too deeply") from exc
        if not isinstance(payload, dict):
            raise RequestError(400, "JSON Value is not an object: expected {\"instances\": [...]} or {\"inputs\": ...}")
        name = payload.get("signature_name", "serving_default")
        if not isinstance(name, str):
            raise RequestError(400, f"'signature_name' must be a string, got {type(name).__name__}")
        if name not in self.signatures:
            raise RequestError(400, f'Serving signature name: "{name}" not found in signature def')
        signature = self.signatures[name]
        specs = signature.specs
        if "instances" in payload and "inputs" in payload:
            raise RequestError(400, "Both 'instances' and 'inputs' keys are present: use one of them")
        if "instances" in payload:
            columns = _rows_to_columns(payload["instances"], specs)
        elif "inputs" in payload:
            columns = _columnar(payload["inputs"], specs)
        else:
            raise RequestError(400, "Missing 'inputs' or 'instances' key")
        arrays = {k: _array(k, v, specs[k]) for k, v in columns.items()}
        if self.batching and signature.batchable:
            # Requests batch together only where every input but the batch dimension agrees.
            key = (name, *((k, v.shape[1:], v.dtype.str) for k, v in sorted(arrays.items())))
            outputs = self.batching.run(key, lambda batch, until: _call(signature.function, batch, until), arrays,
                                        deadline)
        else:
            outputs = _call(signature.function, arrays, deadline)
        lists = {k: v.tolist() for k, v in outputs.items()}
        if "instances" in payload:
            rows = [{k: v[i] for k, v in lists.items()} for i in range(len(payload["instances"]))]
            return {"predictions": [next(iter(r.values())) if len(r) == 1 else r for r in rows]}
        return {"outputs": lists}


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


def _array(name: str, values: Any, spec: Any) -> np.ndarray:
    import tensorflow as tf

    try:
        if spec.dtype == tf.string:
            array = np.asarray(_strings(name, values), dtype=object)
        else:
            try:
                array = np.asarray(values, dtype=spec.dtype.as_numpy_dtype)
            except (TypeError, ValueError) as exc:
                raise RequestError(400, f"input '{name}': not a {spec.dtype.name} tensor: {exc}") from exc
    except RecursionError as exc:  # lists that json could still parse, too deep to walk
        raise RequestError(400, f"input '{name}': lists nested too deeply for a "
                                f"{spec.shape.rank}-dimensional input") from exc
    if not spec.shape.is_compatible_with(array.shape):
        raise RequestError(400, f"input '{name}': shape {list(array.shape)} does not match the signature's "
                                f"{spec.shape.as_list()}")
    return array


def _strings(name: str, values: Any) -> Any:
    """Nested lists of ``{"b64": ...}`` or plain strings -> the same nesting of bytes."""
    if isinstance(values, list):
        return [_strings(name, v) for v in values]
    if isinstance(values, dict) and set(values) == {"b64"} and isinstance(values["b64"], str):
        try:
            return base64.b64decode(values["b64"], validate=True)
        except ValueError as exc:  # binascii.Error, or characters that are not ASCII
            raise RequestError(400, f"input '{name}': the 'b64' value is not valid base64: {exc}") from exc
    if isinstance(values, str):
        try:
            return values.encode()
        except UnicodeEncodeError as exc:  # a lone surrogate such as "\ud800", which JSON allows
            raise RequestError(400, f"input '{name}': a string that is not valid Unicode: {exc}") from exc
    raise RequestError(400, f"input '{name}': expected a string or {{\"b64\": \"...\"}}, got {json.dumps(values)[:80]}")


def _call(function, arrays: dict[str, np.ndarray], deadline: float | None) -> dict[str, np.ndarray]:
    """``function`` on ``arrays``, cancelled at ``deadline`` (time.monotonic()) as TF Serving's session
    run is at its timeout: TensorFlow stops between two ops, the one running finishes first."""
    import tensorflow as tf
    from tensorflow.python.eager import cancellation  # what a session run's timeout uses, for functions

    manager = cancellation.CancellationManager()
    timer = None if deadline is None else threading.Timer(max(0.0, deadline - time.monotonic()), manager.start_cancel)
    if timer:
        timer.start()
    try:
        outputs = manager.get_cancelable_function(function)(**{k: tf.constant(v) for k, v in arrays.items()})
        return {k: v.numpy() for k, v in outputs.items()}
    except (tf.errors.InvalidArgumentError, ValueError, TypeError) as exc:
        # TF Serving answers INVALID_ARGUMENT (undecodable image, bad shape) with 400.
        raise RequestError(400, error_reason(exc)) from exc
    except tf.errors.CancelledError as exc:  # TF Serving: DEADLINE_EXCEEDED, answered 504
        raise RequestError(504, "Deadline exceeded: the request ran past --rest_api_timeout_in_ms") from exc
    finally:
        if timer:
            timer.cancel()


def error_reason(exc: Exception) -> str:
    """The line of a TensorFlow error that says what is wrong, without graph-node noise: TF Serving's 400 text."""
    message = getattr(exc, "message", None) or str(exc)
    noise = ("Graph execution error", "Detected at node", "<stack traces", "[[")
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return next((line for line in lines if not line.startswith(noise)), lines[0] if lines else "invalid argument")


# --------------------------------------------------------------------------- batching


@dataclasses.dataclass(frozen=True)
class BatchingParameters:
    """TF Serving's BatchingParameters, with its defaults for fields a file leaves out."""

    max_batch_size: int = 1000  # examples (instances) per batch, not requests
    batch_timeout_micros: int = 0  # longest wait for a batch to fill once its first request is queued
    num_batch_threads: int = dataclasses.field(default_factory=lambda: os.cpu_count() or 1)
    max_enqueued_batches: int = 10  # queue capacity, in batches; beyond it requests get 503

    @classmethod
    def parse(cls, text: str, source: str) -> BatchingParameters:
        """The text format of ``--batching_parameters_file``: ``max_batch_size { value: 8 }`` ..."""
        entry = re.compile(r"(\w+)\s*\{\s*value\s*:\s*(-?\d+)\s*\}")
        text = re.sub(r"#[^\n]*", "", text)
        leftover = entry.sub("", text).strip()
        if leftover:
            raise ValueError(f"{source}: cannot read {leftover[:60]!r}: expected fields like "
                             "'max_batch_size { value: 8 }'")
        known = [f.name for f in dataclasses.fields(cls)]
        values = {}
        for key, value in entry.findall(text):
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else f" (known: {', '.join(known)})"
                raise ValueError(f"{source}: unknown field '{key}'{hint}")
            if int(value) < (0 if key == "batch_timeout_micros" else 1):
                raise ValueError(f"{source}: {key} must be {'>= 0' if key == 'batch_timeout_micros' else '>= 1'}")
            values[key] = int(value)
        return cls(**values)


Run = Callable[[dict[str, np.ndarray], float | None], dict[str, np.ndarray]]  # (inputs, deadline) -> outputs


@dataclasses.dataclass(eq=False)
class _Task:
    key: tuple
    run: Run
    inputs: dict[str, np.ndarray]
    size: int
    queued_at: float
    deadline: float | None  # time.monotonic() past which its request is given up
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    outputs: dict[str, np.ndarray] | None = None
    error: BaseException | None = None


class BatchScheduler:
    """Concurrent requests with the same key run as one batch, as TF Serving's
    BasicBatchScheduler runs them: a batch closes when it holds ``max_batch_size`` examples
    or ``batch_timeout_micros`` after its first request was queued, whichever comes first, and
    one of ``num_batch_threads`` threads runs it. With a timeout of 0 a lone request never
    waits; under load, requests that queue while the threads are busy share the next batch.
    """

    def __init__(self, parameters: BatchingParameters):
        self.parameters = parameters
        self.batch_sizes: collections.Counter[int] = collections.Counter()  # batches run, by requests in each
        self._queue: collections.deque[_Task] = collections.deque()
        self._queued = 0  # examples waiting
        self._changed = threading.Condition()

    def start(self) -> None:
        """Start the batch threads, in the process that serves (threads do not survive a fork)."""
        for number in range(self.parameters.num_batch_threads):
            threading.Thread(target=self._work, name=f"batch-{number}", daemon=True).start()

    def run(self, key: tuple, run: Run, inputs: dict[str, np.ndarray], deadline: float | None = None
            ) -> dict[str, np.ndarray]:
        """``run(inputs, deadline)``, possibly concatenated with other requests' inputs along axis 0.

        As TF Serving's batching session: a batch whose every request is past its deadline when
        it is taken from the queue is not run (429); one that is runs until the latest deadline of
        its requests.
        """
        size = len(next(iter(inputs.values())))
        p = self.parameters
        if size > p.max_batch_size:
            raise RequestError(400, f"Task size {size} is larger than maximum batch size {p.max_batch_size}")
        task = _Task(key, run, inputs, size, time.monotonic(), deadline)
        with self._changed:
            if self._queued + size > p.max_enqueued_batches * p.max_batch_size:
                raise RequestError(503, "The batch scheduling queue to which this task was submitted is full")
            self._queue.append(task)
            self._queued += size
            self._changed.notify_all()
        task.done.wait()
        if task.error is not None:
            raise task.error
        return task.outputs

    def _next_batch(self) -> list[_Task]:
        """Called holding the lock: wait until the oldest request's batch may close, take it."""
        timeout = self.parameters.batch_timeout_micros / 1e6
        while True:
            if self._queue:
                first = self._queue[0]
                batch, size, full = [], 0, False
                for task in self._queue:
                    if task.key == first.key:
                        if size + task.size > self.parameters.max_batch_size:
                            full = True
                            break
                        batch.append(task)
                        size += task.size
                wait = first.queued_at + timeout - time.monotonic()
                if full or size == self.parameters.max_batch_size or wait <= 0:
                    for task in batch:
                        self._queue.remove(task)
                    self._queued -= size
                    return batch
                self._changed.wait(wait)
            else:
                self._changed.wait()

    def _work(self) -> None:
        while True:
            with self._changed:
                batch = self._next_batch()
            self._run(batch)

    def _run(self, batch: list[_Task]) -> None:
        deadlines = [task.deadline for task in batch]
        deadline = None if None in deadlines else max(deadlines)
        inputs = {name: np.concatenate([task.inputs[name] for task in batch]) for name in batch[0].inputs}
        try:
            if deadline is not None and deadline <= time.monotonic():
                raise RequestError(429, "Run() timeout exceeded while waiting in batching queue")
            outputs = batch[0].run(inputs, deadline)
        except Exception as exc:
            past_deadline = isinstance(exc, RequestError) and exc.status in (429, 504)
            if len(batch) > 1 and not past_deadline:  # one request's bad image fails the whole call: only it may
                for task in batch:
                    self._run([task])
                return
            for task in batch:
                task.error = exc
                task.done.set()
            return
        with self._changed:
            self.batch_sizes[len(batch)] += 1
        start = 0
        for task in batch:
            task.outputs = {k: v[start:start + task.size] for k, v in outputs.items()}
            start += task.size
            task.done.set()


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

    @app.errorhandler(500)  # a bug here: still JSON, as every answer of TF Serving is
    def internal_error(exc) -> Response:
        cause = getattr(exc, "original_exception", None) or exc
        return reply(500, {"error": f"{request.method} {request.path}: {type(cause).__name__}: {cause}"})

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
    parser = command_parser("detkit.serve.tfserving", __doc__)
    # tensorflow_model_server's flags, so the container's entrypoint can start either.
    parser.add_argument("--rest_api_port", type=int, default=8501)
    parser.add_argument("--model_name", help="default: export.model_name")
    parser.add_argument("--model_base_path", type=Path, help="default: models/export/<export.model_name>")
    parser.add_argument("--rest_api_num_threads", type=int, default=8)
    parser.add_argument("--rest_api_timeout_in_ms", type=int, default=60_000)
    parser.add_argument("--rest_api_host", default="127.0.0.1", help="stand-in only: address to bind")
    parser.add_argument("--enable_batching", nargs="?", const="true", default="false", choices=["true", "false"])
    parser.add_argument("--batching_parameters_file", type=Path, help="BatchingParameters in text format")
    for ignored in ("--port", "--tensorflow_intra_op_parallelism", "--tensorflow_inter_op_parallelism"):
        parser.add_argument(ignored, nargs="?", const="true", help="accepted for compatibility, ignored here")
    return run_command(parser, argv, serve_command)


def serve_command(args: argparse.Namespace) -> int:
    # The config only where it has a say: the container's entrypoint names the model, and no params.yaml is there.
    if args.overrides or args.model_name is None or args.model_base_path is None:
        cfg = load(args)
        args.model_name = args.model_name or cfg.export.model_name
        args.model_base_path = args.model_base_path or export_folder(cfg)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s tfserving %(levelname)s %(message)s")
    if not args.model_base_path.is_dir():
        return fail(f"--model_base_path {args.model_base_path}: no such folder")
    batching = None
    if args.enable_batching == "true":
        try:
            file = args.batching_parameters_file
            parameters = BatchingParameters.parse(file.read_text(), str(file)) if file else BatchingParameters()
        except (OSError, ValueError) as exc:
            return fail(f"--batching_parameters_file: {exc}")
        log.info("batching: %s", parameters)
        batching = BatchScheduler(parameters)
    model = ServedModel(args.model_name, args.model_base_path.resolve(), batching,
                        args.rest_api_timeout_in_ms / 1000 if args.rest_api_timeout_in_ms > 0 else None)
    serve(model, args.rest_api_host, args.rest_api_port, args.rest_api_num_threads,
          max(1, args.rest_api_timeout_in_ms // 1000))
    return 0


if __name__ == "__main__":
    sys.exit(main())
