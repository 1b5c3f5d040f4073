"""The TF Serving REST stand-in behind the container's nginx config, serving the model that
`make demo` trained and exported: the REST requests of docs/export.md, bad requests, load."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from detkit.serve.predict import request_body
from detkit.serve.tfserving import BatchingParameters, BatchScheduler, RequestError
from harness.images import gif_of_frames, jpeg_with_scans, png_declaring
from harness.serving import descendants

pytestmark = pytest.mark.slow

OUTPUT_SHAPES = {"detection_boxes": (100, 4), "detection_classes": (100,), "detection_scores": (100,),
                 "num_detections": ()}


def rest_request(image: bytes) -> str:
    """The body of docs/export.md, built as a client would."""
    encoded_input_string = base64.b64encode(image).decode("utf-8")
    return json.dumps({"signature_name": "serving_default", "instances": [{"inputs": {"b64": encoded_input_string}}]})


def post(url: str, data, **kwargs) -> requests.Response:
    return requests.post(url, data=data, headers={"content-type": "application/json"}, timeout=60, **kwargs)


def iou(a, b) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def check_prediction(prediction: dict) -> None:
    assert {k: np.shape(v) for k, v in prediction.items()} == OUTPUT_SHAPES
    scores = prediction["detection_scores"]
    assert scores == sorted(scores, reverse=True)
    boxes = np.array(prediction["detection_boxes"])
    assert boxes.min() >= 0.0 and boxes.max() <= 1.0
    n = int(prediction["num_detections"])
    assert all(1 <= c <= 37 for c in prediction["detection_classes"][:n])


def recode(encoded: bytes, fmt: str, size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(encoded)).convert("RGB").resize(size).save(buffer, fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("route", ["predict", "invocations"])
def test_rest_request_finds_the_pet(served, val_examples, route):
    url = f"{served.tfs_url}:predict" if route == "predict" else served.invocations_url
    example = val_examples[0]
    response = post(url, rest_request(example["encoded"]))
    assert response.status_code == 200, response.text
    prediction = response.json()["predictions"][0]
    check_prediction(prediction)
    top_box, top_class = prediction["detection_boxes"][0], int(prediction["detection_classes"][0])
    assert iou(top_box, example["boxes"][0]) > 0.5, (example["filename"], top_box, example["boxes"][0])
    assert top_class == example["labels"][0], example["filename"]


def test_batch_of_three_sizes_and_formats(served, val_examples):
    images = [val_examples[0]["encoded"], recode(val_examples[1]["encoded"], "PNG", (321, 207)),
              recode(val_examples[2]["encoded"], "GIF", (150, 390))]
    response = post(served.invocations_url, request_body(images))
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert len(predictions) == 3
    for prediction in predictions:
        check_prediction(prediction)
    # Each image is answered for itself: the JPEG alone gives the same detections.
    alone = post(served.invocations_url, request_body(images[:1])).json()["predictions"][0]
    np.testing.assert_allclose(alone["detection_boxes"], predictions[0]["detection_boxes"], atol=1e-5)


def test_columnar_request_answers_outputs(served, val_examples):
    body = json.dumps({"inputs": {"inputs": [{"b64": base64.b64encode(val_examples[0]["encoded"]).decode()}]}})
    response = post(f"{served.tfs_url}:predict", body)
    assert response.status_code == 200, response.text
    outputs = response.json()["outputs"]
    assert {k: np.shape(v) for k, v in outputs.items()} == {k: (1, *s) for k, s in OUTPUT_SHAPES.items()}
    rows = post(f"{served.tfs_url}:predict", rest_request(val_examples[0]["encoded"])).json()["predictions"]
    assert outputs["detection_classes"][0] == rows[0]["detection_classes"]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


BAD_REQUESTS = {
    "invalid JSON": ("POST", "invocations", b'{"instances": [', 400, "JSON Parse error"),
    "missing instances": ("POST", "invocations", json.dumps({"signature_name": "serving_default"}), 400,
                          "Missing 'inputs' or 'instances'"),
    "non-image b64": ("POST", "invocations", json.dumps({"instances": [{"inputs": {"b64": b64(b"not an image")}}]}),
                      400, "Unknown image file format"),
    "invalid base64": ("POST", "invocations", json.dumps({"instances": [{"inputs": {"b64": "@@not base64@@"}}]}),
                       400, "not valid base64"),
    "empty body": ("POST", "invocations", b"", 400, "JSON Parse error"),
    "empty instances": ("POST", "invocations", json.dumps({"instances": []}), 400, "non-empty list"),
    "7 MB body": ("POST", "invocations", b"x" * (7 << 20), 413, "6 MB"),
    "unknown model": ("POST", "/v1/models/no_such_model:predict", "{}", 404, "no_such_model"),
    "unknown version": ("POST", "/v1/models/{name}/versions/99:predict", "{}", 404, "Specific("),
    "unknown signature": ("POST", "invocations", json.dumps({"signature_name": "classify", "instances": [{"b64": ""}]}),
                          400, 'Serving signature name: "classify" not found'),
    "GET on /invocations": ("GET", "invocations", None, 405, "use POST"),
    "unknown path": ("GET", "/nothing/here", None, 404, "/ping and POST /invocations"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=list(BAD_REQUESTS))
def test_bad_requests_get_a_json_4xx_and_serving_goes_on(served, val_examples, case):
    method, where, body, status, message = BAD_REQUESTS[case]
    if where == "invocations":
        url = served.invocations_url
    elif where.startswith("/v1/"):
        url = f"http://127.0.0.1:{served.tfs_port}{where.format(name=served.model_name)}"
    else:
        url = f"{served.base}{where}"
    response = requests.request(method, url, data=body, headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    good = post(served.invocations_url, rest_request(val_examples[0]["encoded"]))
    assert good.status_code == 200


@pytest.mark.parametrize("route", ["predict", "invocations"])
def test_an_image_over_the_pixel_limit_gets_a_400_and_serving_goes_on(served, val_examples, route):
    url = f"{served.tfs_url}:predict" if route == "predict" else served.invocations_url
    response = post(url, rest_request(png_declaring(20000, 20000)))
    assert response.status_code == 400, response.text
    assert response.json()["error"] == ("assertion failed: [image of 20000 x 20000 pixels exceeds "
                                        "export.max_image_pixels = 25000000: refused before decoding]")
    good = post(url, rest_request(val_examples[0]["encoded"]))
    assert good.status_code == 200, good.text


def tree_rss(pid: int) -> int:
    return sum(int(Path(f"/proc/{p}/statm").read_text().split()[1]) * 4096 for p in [pid, *descendants(pid)])


def flat_jpeg(width: int, height: int, **options) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (90, 140, 60)).save(buffer, "JPEG", **options)
    return buffer.getvalue()


HOSTILE = {  # image -> what the 400 names; each under 200 KB
    "GIF frame past its 10 x 10 screen": (gif_of_frames((10, 10), [(0, 0, 10, 10), (0, 0, 6000, 6000)]),
                                          "image of 6000 x 6000 pixels exceeds export.max_image_pixels = 25000000"),
    "GIF frames over the limit together": (gif_of_frames((3000, 3000), [(0, 0, 3000, 3000)] * 8),
                                           "more than the 75000000 bytes (3 a pixel) of export.max_image_pixels"),
    "JPEG of 2000 scans": (jpeg_with_scans(flat_jpeg(2000, 1500, progressive=True, subsampling=0), 2000),
                           "JPEG of 2010 scans exceeds export.max_jpeg_scans = 64"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_images_get_a_400_naming_the_limit_and_memory_stays_flat(served, val_examples, case):
    image, message = HOSTILE[case]
    assert len(image) < 200_000
    before = tree_rss(served.process.pid)
    started = time.monotonic()
    for _ in range(3):
        response = post(served.invocations_url, rest_request(image))
        assert response.status_code == 400, response.text
        assert message in response.json()["error"]
    seconds = (time.monotonic() - started) / 3
    grown = tree_rss(served.process.pid) - before
    print(f"{case}: 400 in {seconds:.3f} s, serving processes {grown / 2**20:+.0f} MB")
    assert seconds < 1.0
    assert grown < 30 << 20  # decoded, the smallest of these takes 100 MB
    assert post(served.invocations_url, rest_request(val_examples[0]["encoded"])).status_code == 200


def test_status_and_metadata_as_tf_serving(served):
    status = requests.get(served.tfs_url, timeout=10).json()
    assert status["model_version_status"] == [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]
    metadata = requests.get(f"{served.tfs_url}/metadata", timeout=10).json()
    assert metadata["model_spec"] == {"name": served.model_name, "signature_name": "", "version": "1"}
    signature = metadata["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert signature["inputs"]["inputs"]["dtype"] == "DT_STRING"
    assert sorted(signature["outputs"]) == sorted(OUTPUT_SHAPES)
    assert signature["methodName"] == "tensorflow/serving/predict"


def test_ping_fails_until_the_model_is_loaded(served):
    # While starting, /ping answered 502 (model server not up) then 404 (version LOADING):
    # never 200 before the model was AVAILABLE.
    assert served.pings[-1] == 200
    assert 200 not in served.pings[:-1]
    assert 404 in served.pings, served.pings
    assert requests.get(served.ping_url, timeout=10).status_code == 200


def test_eight_clients_for_thirty_seconds_see_no_error(served, val_examples):
    body = rest_request(val_examples[0]["encoded"])
    failures, counts = [], [0] * 8
    deadline = time.monotonic() + 30

    def client(i: int) -> None:
        with requests.Session() as session:
            while time.monotonic() < deadline:
                try:
                    response = session.post(served.invocations_url, data=body,
                                            headers={"content-type": "application/json"}, timeout=60)
                    if response.status_code != 200 or "predictions" not in response.json():
                        failures.append((response.status_code, response.text[:200]))
                except requests.RequestException as exc:
                    failures.append(repr(exc))
                counts[i] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"load: {sum(counts)} requests from 8 clients in 30 s, {len(failures)} failed")
    assert not failures, failures[:5]
    assert min(counts) > 0


def test_eight_clients_with_different_images_each_get_their_own_answer(served, val_examples):
    # Batching is on by default: concurrent requests share batches, and each answer must still
    # be the one its image gets when it is sent alone.
    assert "batching: BatchingParameters(max_batch_size=32, batch_timeout_micros=0" in served.output(last=None)
    images = [example["encoded"] for example in val_examples[:8]]
    alone = [post(served.invocations_url, rest_request(image)).json()["predictions"][0] for image in images]
    answers: dict[int, list] = {i: [] for i in range(8)}

    def client(i: int) -> None:
        with requests.Session() as session:
            for _ in range(10):
                response = session.post(served.invocations_url, data=rest_request(images[i]),
                                        headers={"content-type": "application/json"}, timeout=60)
                answers[i].append(response.json()["predictions"][0])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, got in answers.items():
        assert len(got) == 10
        for prediction in got:
            assert prediction["detection_classes"] == alone[i]["detection_classes"], i
            np.testing.assert_allclose(prediction["detection_boxes"], alone[i]["detection_boxes"], atol=1e-4)


# --------------------------------------------------------------------------- batching


def test_batching_parameters_are_read_as_tf_serving_writes_them():
    text = ("max_batch_size { value: 32 }\nbatch_timeout_micros { value: 0 }  # comment\n"
            "num_batch_threads { value: 2 }\nmax_enqueued_batches { value: 100 }\n")
    assert BatchingParameters.parse(text, "b.config") == BatchingParameters(32, 0, 2, 100)
    assert BatchingParameters.parse("max_batch_size { value: 4 }", "b.config").max_enqueued_batches == 10
    with pytest.raises(ValueError, match="b.config: unknown field 'max_batch_sise'; did you mean 'max_batch_size'"):
        BatchingParameters.parse("max_batch_sise { value: 4 }", "b.config")
    with pytest.raises(ValueError, match="b.config: num_batch_threads must be >= 1"):
        BatchingParameters.parse("num_batch_threads { value: 0 }", "b.config")
    with pytest.raises(ValueError, match="b.config: cannot read 'max_batch_size: 4'"):
        BatchingParameters.parse("max_batch_size: 4", "b.config")


class Model:
    """A model for the scheduler: doubles its input, remembers each batch it ran, and can be
    held (to let requests queue up) or fail on negative input (a bad image)."""

    def __init__(self):
        self.batches: list[list[int]] = []
        self.release = threading.Event()
        self.release.set()

    def __call__(self, inputs, deadline):
        self.release.wait(10)
        x = inputs["x"]
        if (x < 0).any():
            raise RequestError(400, f"bad input {x.tolist()}")
        self.batches.append(x.tolist())
        return {"y": x * 2}


def submit_all(scheduler, model, values, pause_s: float = 0.0) -> dict:
    results = {}

    def request(value):
        try:
            results[value] = scheduler.run(("sig",), model, {"x": np.array([value])})["y"].tolist()
        except RequestError as exc:
            results[value] = (exc.status, exc.message)

    threads = []
    for value in values:
        threads.append(threading.Thread(target=request, args=(value,)))
        threads[-1].start()
        time.sleep(pause_s)
    for t in threads:
        t.join()
    return results


def scheduler_with(**parameters) -> BatchScheduler:
    scheduler = BatchScheduler(BatchingParameters(**{"num_batch_threads": 1, **parameters}))
    scheduler.start()
    return scheduler


@contextlib.contextmanager
def model_busy(scheduler, model, running: list[int], queued: list[int], pause_s: float = 0.0):
    """The model held on a batch of ``running`` while ``queued`` requests queue up behind it;
    released when the block ends."""
    model.release.clear()
    threads = [threading.Thread(target=submit_all, args=(scheduler, model, running))]
    threads[0].start()
    time.sleep(0.2)  # running (held) by now: with no timeout it did not wait for company
    threads.append(threading.Thread(target=submit_all, args=(scheduler, model, queued, pause_s)))
    threads[1].start()
    time.sleep(0.3)
    try:
        yield
    finally:
        model.release.set()
        for t in threads:
            t.join()


def test_requests_queued_while_the_model_is_busy_share_one_batch_and_get_their_own_rows():
    model = Model()
    scheduler = scheduler_with(max_batch_size=8, batch_timeout_micros=0)
    with model_busy(scheduler, model, [100], [1, 2, 3, 4, 5, 6, 7], pause_s=0.01):
        pass
    assert model.batches[0] == [100]
    assert sorted(model.batches[1]) == [1, 2, 3, 4, 5, 6, 7]  # all seven in the next batch
    assert scheduler.batch_sizes == {1: 1, 7: 1}


def test_timeout_lets_a_batch_wait_for_company_and_a_full_batch_goes_at_once():
    model = Model()
    started = time.monotonic()
    results = submit_all(scheduler_with(max_batch_size=2, batch_timeout_micros=5_000_000), model, [1, 2, 3, 4], 0.05)
    assert results == {1: [2], 2: [4], 3: [6], 4: [8]}
    assert sorted(map(sorted, model.batches)) == [[1, 2], [3, 4]]
    assert time.monotonic() - started < 2.5  # each batch went when full, not after its 5 s timeout


def test_full_queue_answers_503_and_too_big_a_request_400():
    model = Model()
    scheduler = scheduler_with(max_batch_size=2, max_enqueued_batches=1)
    with (model_busy(scheduler, model, [1], [2, 3]),  # 2 and 3 fill the queue: one batch of 2
          pytest.raises(RequestError, match="queue to which this task was submitted is full") as full):
        scheduler.run(("sig",), model, {"x": np.array([4])})
    assert full.value.status == 503
    with pytest.raises(RequestError, match="Task size 3 is larger than maximum batch size 2"):
        scheduler.run(("sig",), model, {"x": np.array([1, 2, 3])})


def test_a_bad_request_in_a_batch_fails_alone():
    model = Model()
    scheduler = scheduler_with(max_batch_size=8, batch_timeout_micros=300_000)
    results = submit_all(scheduler, model, [1, -1, 2], 0.02)
    assert results == {1: [2], -1: (400, "bad input [-1]"), 2: [4]}
