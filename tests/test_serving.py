"""serving/: the container's nginx config and entrypoint, run on the host with the TF Serving
stand-in in place of the binary (the container runs the real one)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from PIL import Image

from detkit.serve.predict import request_body
from harness.httpserver import free_port
from harness.repo_copy import make, make_in_background, user_env
from harness.serving import REPO_ROOT, ServingStack, alive, descendants

pytestmark = pytest.mark.slow


def test_rendered_nginx_config_passes_nginx_t(tmp_path):
    env = dict(os.environ, MODEL_NAME="pet_object_detection", NGINX_LISTEN="127.0.0.1:8080", TFS_REST_PORT="8501",
               TFS_NUM_BATCH_THREADS="4", INVOCATION_TIMEOUT_S="60", CLIENT_TIMEOUT_S="60")
    subprocess.run([str(REPO_ROOT / "serving" / "render-nginx-conf.sh"), str(tmp_path)], env=env, check=True)
    config = (tmp_path / "nginx.conf").read_text()
    assert "proxy_pass http://tensorflow_serving/v1/models/pet_object_detection:predict;" in config
    # nginx -t loads the njs module and compiles the script: a syntax error in it fails here.
    assert "load_module modules/ngx_http_js_module.so;" in config
    assert f"js_import invocations from {REPO_ROOT / 'serving' / 'invocations.js'};" in config
    assert '"MaxConcurrentTransforms": 4,' in config
    assert "client_max_body_size 6m;" in config and "proxy_read_timeout 60s;" in config
    assert "${" not in config  # every placeholder filled; nginx's own $variables stay
    result = subprocess.run(["nginx", "-t", "-e", "stderr", "-c", str(tmp_path / "nginx.conf")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_sigterm_stops_both_servers_within_30_s(demo_repo):
    with ServingStack(demo_repo / "models" / "export") as stack:
        servers = descendants(stack.process.pid)
        assert len(servers) >= 3  # TF Serving stand-in (+ its worker), nginx master + workers
        seconds = stack.stop(timeout_s=30)
        print(f"entrypoint: both servers stopped {seconds:.1f} s after SIGTERM")
        assert stack.process.returncode == 0
        assert not [pid for pid in servers if alive(pid)]
        assert seconds < 30
        with pytest.raises(requests.ConnectionError):
            requests.get(stack.ping_url, timeout=5)


def test_a_dying_model_server_takes_nginx_and_the_container_down(demo_repo):
    with ServingStack(demo_repo / "models" / "export") as stack:
        model_server = descendants(stack.process.pid)[0]  # started first: TF Serving
        os.kill(model_server, signal.SIGKILL)
        stack.process.wait(timeout=30)
        assert stack.process.returncode != 0
        assert "a server exited" in stack.output()
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in descendants(stack.process.pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        with pytest.raises(requests.ConnectionError):
            requests.get(stack.ping_url, timeout=5)


def test_dockerfile_passes_hadolint():
    hadolint = Path(sys.executable).with_name("hadolint")
    result = subprocess.run([str(hadolint), str(REPO_ROOT / "serving" / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_batching_settings_reach_the_model_server_and_batch_transform(demo_repo, tmp_path):
    # The real stand-in behind a wrapper that keeps the command line it was started with.
    wrapper = tmp_path / "model_server"
    wrapper.write_text('#!/usr/bin/env bash\nset -euo pipefail\nprintf "%s\\n" "$@" > "$ARGS_FILE"\n'
                       'for a in "$@"; do case "$a" in\n'
                       '  --batching_parameters_file=*) cp "${a#*=}" "$ARGS_FILE.batching";;\n'
                       'esac; done\nexec "$PYTHON" -m detkit.serve.tfserving "$@"\n')
    wrapper.chmod(0o755)
    args_file = tmp_path / "args"
    env = {"TFS_BIN": str(wrapper), "ARGS_FILE": str(args_file), "PYTHON": sys.executable,
           "TFS_ENABLE_BATCHING": "true", "TFS_MAX_BATCH_SIZE": "16", "TFS_BATCH_TIMEOUT_MICROS": "5000",
           "TFS_NUM_BATCH_THREADS": "3"}
    with ServingStack(demo_repo / "models" / "export", env=env) as stack:
        args = args_file.read_text().splitlines()
        batching = (tmp_path / "args.batching").read_text()
        parameters = requests.get(f"{stack.base}/execution-parameters", timeout=10)
    assert "--enable_batching=true" in args
    assert f"--model_base_path={demo_repo / 'models' / 'export' / 'pet_object_detection'}" in args
    assert "max_batch_size { value: 16 }" in batching and "batch_timeout_micros { value: 5000 }" in batching
    # Batch Transform sends as many requests at once as TF Serving has threads to run them.
    assert "num_batch_threads { value: 3 }" in batching
    assert parameters.status_code == 200 and parameters.json()["MaxConcurrentTransforms"] == 3


def test_make_docker_test_says_it_skipped_without_an_engine():
    from detkit.cloud.deploy import DockerEngine

    if DockerEngine.available():
        pytest.skip("a Docker engine exists here: make docker-test really builds the image")
    result = make(REPO_ROOT, "docker-test")
    assert result.returncode == 0
    assert "docker-test: SKIPPED: no Docker engine here" in result.stdout


def test_make_serve_from_a_users_shell_answers_ping_and_invocations(demo_repo, val_examples):
    port = free_port()
    env = user_env(TFS_REST_PORT=str(free_port()), TFS_GRPC_PORT=str(free_port()))
    with make_in_background(demo_repo, "serve", f"SERVE_PORT={port}", env=env) as server:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert server.poll() is None, "make serve exited"
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=5).status_code == 200:
                    break
            time.sleep(0.2)
        response = requests.post(f"http://127.0.0.1:{port}/invocations", timeout=60,
                                 data=request_body([val_examples[0]["encoded"]]),
                                 headers={"content-type": "application/json"})
        assert response.status_code == 200, response.text
        assert response.json()["predictions"][0]["num_detections"] > 0


# --------------------------------------------------------------------------- /invocations bodies


def error_of(response: requests.Response) -> str:
    """The message of a JSON error answer (it fails the test when the body is not one)."""
    assert response.headers["content-type"] == "application/json", response.text
    return response.json()["error"]


def recoded(jpeg: bytes, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(buffer, fmt)
    return buffer.getvalue()


def test_raw_image_bodies_get_the_answer_of_the_json_form(served, val_examples):
    jpeg = val_examples[0]["encoded"]
    images = {"jpeg": jpeg, "png": recoded(jpeg, "PNG"), "gif": recoded(jpeg, "GIF")}
    for fmt, image in images.items():
        as_json = requests.post(served.invocations_url, data=request_body([image]), timeout=60,
                                headers={"content-type": "application/json; charset=utf-8"})
        assert as_json.status_code == 200, as_json.text
        assert as_json.json()["predictions"][0]["num_detections"] > 0
        for content_type in (f"image/{fmt}", "application/x-image"):
            raw = requests.post(served.invocations_url, data=image, headers={"content-type": content_type}, timeout=60)
            assert raw.status_code == 200, (fmt, content_type, raw.text)
            assert raw.headers["content-type"] == "application/json"
            assert raw.json() == as_json.json(), (fmt, content_type)


def test_a_raw_body_that_is_no_image_gets_tf_servings_400(served):
    response = requests.post(served.invocations_url, data=b"not an image", headers={"content-type": "image/png"},
                             timeout=60)
    assert response.status_code == 400
    assert "Unknown image file format" in error_of(response)


@pytest.mark.parametrize("content_type", ["text/plain", None])
def test_other_content_types_get_415_naming_the_accepted_ones(served, content_type):
    headers = {"content-type": content_type} if content_type else {}
    response = requests.post(served.invocations_url, data=b"hello", headers=headers, timeout=60)
    assert response.status_code == 415
    message = error_of(response)
    assert (f'"{content_type}"' if content_type else "no Content-Type") in message
    for accepted in ("application/json", "image/jpeg", "image/png", "image/gif", "application/x-image"):
        assert accepted in message


def test_execution_parameters_for_batch_transform(served):
    response = requests.get(f"{served.base}/execution-parameters", timeout=10)
    assert response.status_code == 200
    nproc = int(subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout)  # the default
    assert response.json() == {"MaxConcurrentTransforms": nproc, "BatchStrategy": "SINGLE_RECORD",
                               "MaxPayloadInMB": 6}
    refused = requests.post(f"{served.base}/execution-parameters", timeout=10)
    assert refused.status_code == 405 and "use GET" in error_of(refused)


# Bodies that once got the stand-in's HTML 500 (Python's json recursing past its limit, a list
# as a dict key, str.encode on a lone surrogate), and other malformed ones: a JSON 400 each.
MALFORMED = {
    "arrays 50000 deep": (b"[" * 50000 + b"]" * 50000, "nested too deeply"),
    "objects 50000 deep": (b'{"a":' * 50000 + b"1" + b"}" * 50000, "nested too deeply"),
    "an input 900 lists deep": (b'{"instances": [{"inputs": ' + b"[" * 900 + b'"x"' + b"]" * 900 + b"}]}",
                                "nested too deeply"),
    "not UTF-8": (b'{"instances": ["\xff"]}', "JSON Parse error"),
    "a string": (b'"hello"', "not an object"),
    "a 5000-digit number": (b'{"instances": [1' + b"0" * 5000 + b"]}", "JSON Parse error"),
    "instances an object": (b'{"instances": {"b64": "aGk="}}', "must be a non-empty list"),
    "b64 a number": (b'{"instances": [{"inputs": {"b64": 5}}]}', "expected a string"),
    "b64 not ASCII": ('{"instances": [{"b64": "\u00e9"}]}'.encode(), "not valid base64"),
    "a lone surrogate": (b'{"instances": ["\\ud800"]}', "not valid Unicode"),
    "signature_name a list": (b'{"signature_name": [], "instances": [{"b64": "aGk="}]}', "must be a string"),
}


@pytest.mark.parametrize("route", ["invocations", "predict"])
@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_json_gets_a_json_400_and_serving_goes_on(served, val_examples, route, case):
    url = served.invocations_url if route == "invocations" else f"{served.tfs_url}:predict"
    body, message = MALFORMED[case]
    response = requests.post(url, data=body, headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == 400, response.text
    assert message in error_of(response)
    good = requests.post(url, data=request_body([val_examples[0]["encoded"]]), timeout=60,
                         headers={"content-type": "application/json"})
    assert good.status_code == 200, good.text


def test_a_request_nginx_cannot_parse_gets_a_json_400(served):
    with socket.create_connection(("127.0.0.1", served.nginx_port), timeout=10) as connection:
        connection.sendall(b"POST /invocations HTTP/1.1\r\nContent-Length: many\r\n\r\n")
        answer = connection.makefile("rb").read().decode()
    head, body = answer.split("\r\n\r\n", 1)
    assert head.startswith("HTTP/1.1 400") and "Content-Type: application/json" in head
    assert json.loads(body) == {"error": "malformed HTTP request"}


# --------------------------------------------------------------------------- nginx's own answers


@pytest.fixture(scope="module")
def nginx_alone(tmp_path_factory):
    """The container's nginx config, rendered as the entrypoint renders it, with no model server
    behind it (its upstream port is free: 502) and a 1 s wait for clients."""
    folder = tmp_path_factory.mktemp("nginx")
    port = free_port()
    env = dict(os.environ, MODEL_NAME="pet_object_detection", NGINX_LISTEN=f"127.0.0.1:{port}",
               TFS_REST_PORT=str(free_port()), TFS_NUM_BATCH_THREADS="2", INVOCATION_TIMEOUT_S="60",
               CLIENT_TIMEOUT_S="1")
    subprocess.run([str(REPO_ROOT / "serving" / "render-nginx-conf.sh"), str(folder)], env=env, check=True)
    nginx = subprocess.Popen(["nginx", "-e", "stderr", "-c", str(folder / "nginx.conf")], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            break
        time.sleep(0.05)
    yield port
    nginx.terminate()
    nginx.wait(timeout=10)


def raw_answer(port: int, request: bytes) -> tuple[str, dict, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(request)
        answer = connection.makefile("rb").read()
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    return lines[0], dict(line.split(": ", 1) for line in lines[1:] if ": " in line), body


NGINX_STATUSES = {  # a request nginx answers itself, without the model server -> (status, message)
    "malformed request line": (b"GARBAGE\r\n\r\n", 400, "malformed HTTP request"),
    "oversized header": (b"GET /ping HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", 400,
                         "request headers too large"),
    "TRACE": (b"TRACE /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 405, "method not allowed"),
    "body over 6 MB": (b"POST /invocations HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: image/png\r\n"
                       b"Content-Length: 7000000\r\n\r\n", 413, "6 MB"),
    "request line too long": (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "request line too long"),
    "unknown transfer encoding": (b"POST /invocations HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                  b"Transfer-Encoding: gzip\r\n\r\n", 501, "transfer encoding"),
    "HTTP/2.0 request line": (b"GET /ping HTTP/2.0\r\nHost: x\r\n\r\n", 505, "HTTP version not supported"),
    "model server down": (b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 502, "not reachable"),
}


@pytest.mark.parametrize("case", NGINX_STATUSES)
def test_every_error_nginx_answers_itself_is_json(nginx_alone, case):
    request, status, message = NGINX_STATUSES[case]
    line, headers, body = raw_answer(nginx_alone, request)
    assert line.startswith(f"HTTP/1.1 {status} "), (line, body[:200])
    assert headers["Content-Type"] == "application/json"
    assert message in json.loads(body)["error"]


def test_a_client_that_stalls_gets_the_connection_closed_without_a_page(nginx_alone):
    # nginx logs 408 for a body that stops coming, and closes the connection: nothing to read but EOF.
    started = time.monotonic()
    line, _, body = raw_answer(nginx_alone, b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                                            b"Content-Length: 100\r\n\r\nabc")
    assert (line, body) == ("", b"")
    assert time.monotonic() - started < 5  # CLIENT_TIMEOUT_S=1


def test_the_model_server_must_give_up_before_nginx(demo_repo):
    env = dict(os.environ, MODEL_BASE_PATH=str(demo_repo / "models" / "export"), INVOCATION_TIMEOUT_S="5",
               TFS_REST_API_TIMEOUT_MS="5000", NGINX_LISTEN=f"127.0.0.1:{free_port()}")
    result = subprocess.run([str(REPO_ROOT / "serving" / "entrypoint.sh"), "serve"], env=env, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 2
    assert "TF Serving must give up on a request before nginx does" in result.stderr


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_request_nginx_has_timed_out_is_not_decoded_to_the_end(demo_repo):
    # nginx waits 4 s, the model server 0.3 s. 32 images (TFS_MAX_BATCH_SIZE) of 4800 x 4800 take the model
    # server some 3 s on a quiet 2-core machine, more when loaded, to decode and detect: it answers 504 at
    # its deadline and stops, within one image's decode.
    big = io.BytesIO()
    Image.new("RGB", (4800, 4800), (90, 140, 60)).save(big, "PNG")
    body = request_body([big.getvalue()] * 32)
    env = {"INVOCATION_TIMEOUT_S": "4", "TFS_REST_API_TIMEOUT_MS": "300"}
    with ServingStack(demo_repo / "models" / "export", env=env) as stack:
        model_server = descendants(stack.process.pid)[0]
        server_pids = [model_server, *descendants(model_server)]
        started = time.monotonic()
        response = requests.post(stack.invocations_url, data=body, headers={"content-type": "application/json"},
                                 timeout=60)
        answered = time.monotonic() - started
        before = sum(cpu_seconds(pid) for pid in server_pids if alive(pid))
        time.sleep(4)
        after = sum(cpu_seconds(pid) for pid in server_pids if alive(pid))
        good = requests.get(stack.ping_url, timeout=10)
    print(f"answered {response.status_code} in {answered:.1f} s; model server CPU in the 4 s after: "
          f"{after - before:.2f} s")
    assert response.status_code == 504
    assert "Deadline exceeded" in error_of(response)
    assert answered < 4
    assert after - before < 1.0  # not decoding the remaining images
    assert good.status_code == 200
