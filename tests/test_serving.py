"""serving/: the container's nginx config and entrypoint, run on the host with the TF Serving
stand-in in place of the binary (the container runs the real one)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from detkit.predict import request_body
from tests.httpserver import free_port
from tests.repo_copy import make, make_in_background, user_env
from tests.serving import REPO_ROOT, ServingStack, alive, descendants

pytestmark = pytest.mark.slow


def test_rendered_nginx_config_passes_nginx_t(tmp_path):
    env = dict(os.environ, MODEL_NAME="pet_object_detection", NGINX_LISTEN="127.0.0.1:8080", TFS_REST_PORT="8501")
    subprocess.run([str(REPO_ROOT / "serving" / "render-nginx-conf.sh"), str(tmp_path)], env=env, check=True)
    config = (tmp_path / "nginx.conf").read_text()
    assert "proxy_pass http://tensorflow_serving/v1/models/pet_object_detection:predict;" in config
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


def test_batching_settings_reach_the_model_server(demo_repo, tmp_path):
    # The real stand-in behind a wrapper that keeps the command line it was started with.
    wrapper = tmp_path / "model_server"
    wrapper.write_text('#!/usr/bin/env bash\nset -euo pipefail\nprintf "%s\\n" "$@" > "$ARGS_FILE"\n'
                       'for a in "$@"; do case "$a" in\n'
                       '  --batching_parameters_file=*) cp "${a#*=}" "$ARGS_FILE.batching";;\n'
                       'esac; done\nexec "$PYTHON" -m detkit.tfserving "$@"\n')
    wrapper.chmod(0o755)
    args_file = tmp_path / "args"
    env = {"TFS_BIN": str(wrapper), "ARGS_FILE": str(args_file), "PYTHON": sys.executable,
           "TFS_ENABLE_BATCHING": "true", "TFS_MAX_BATCH_SIZE": "16", "TFS_BATCH_TIMEOUT_MICROS": "5000"}
    with ServingStack(demo_repo / "models" / "export", env=env):
        args = args_file.read_text().splitlines()
        batching = (tmp_path / "args.batching").read_text()
    assert "--enable_batching=true" in args
    assert f"--model_base_path={demo_repo / 'models' / 'export' / 'pet_object_detection'}" in args
    assert "max_batch_size { value: 16 }" in batching and "batch_timeout_micros { value: 5000 }" in batching


def test_make_docker_test_says_it_skipped_without_an_engine():
    from detkit.deploy import DockerEngine

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
