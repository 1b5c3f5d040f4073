"""moto in server mode on 127.0.0.1, with the environment boto3 (and DVC) read pointed at it."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import pytest
import requests
from moto.server import ThreadedMotoServer

FAKE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


@contextmanager
def moto_server(env: dict[str, str], unset: Iterable[str] = ("AWS_PROFILE",),
                endpoint_env: bool = True) -> Iterator[str]:
    """Start moto with no AWS resources; set fake credentials, ``env`` and (``endpoint_env``)
    ``AWS_ENDPOINT_URL``; yield its URL.

    moto keeps its resources in this process, not in the server: without the reset, a server would
    start with what an earlier test's server left (a second transform job where a test expects one).
    So one server at a time: a second one started beside it would empty the first."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    try:
        reset(url)
        with pytest.MonkeyPatch.context() as mp:
            for key, value in {**FAKE_CREDENTIALS, **({"AWS_ENDPOINT_URL": url} if endpoint_env else {}),
                               **env}.items():
                mp.setenv(key, value)
            for key in unset:
                mp.delenv(key, raising=False)
            yield url
    finally:
        server.stop()


def reset(url: str) -> None:
    """Empty the moto server at ``url`` (and every other in this process): a module's shared server, per test."""
    requests.post(f"{url}/moto-api/reset", timeout=10).raise_for_status()
