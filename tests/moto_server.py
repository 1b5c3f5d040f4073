"""moto in server mode on 127.0.0.1, with the environment boto3 (and DVC) read pointed at it."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import pytest
from moto.server import ThreadedMotoServer

FAKE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


@contextmanager
def moto_server(env: dict[str, str], unset: Iterable[str] = ("AWS_PROFILE",),
                endpoint_env: bool = True) -> Iterator[str]:
    """Start moto; set fake credentials, ``env`` and (``endpoint_env``) ``AWS_ENDPOINT_URL``; yield its URL."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    try:
        with pytest.MonkeyPatch.context() as mp:
            for key, value in {**FAKE_CREDENTIALS, **({"AWS_ENDPOINT_URL": url} if endpoint_env else {}),
                               **env}.items():
                mp.setenv(key, value)
            for key in unset:
                mp.delenv(key, raising=False)
            yield url
    finally:
        server.stop()
