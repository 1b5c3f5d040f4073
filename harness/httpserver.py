"""A local HTTP file server for tests: 127.0.0.1 only, Range requests, scripted faults.

    with FileServer(folder, cut_first_after=1000) as server:
        url = server.url("images.tar.gz")
        ...
        assert server.requests[1].range == "bytes=1000-"

``dead_url()`` gives a mirror that is down (nothing listens on its port); a name that
is not in the folder answers 404.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


@dataclass
class Request:
    path: str
    range: str | None  # the Range header as sent, None without one
    status: int
    sent: int  # body bytes actually written, after any cut


class FileServer:
    """Serve the files of ``root`` over HTTP from a background thread.

    - ``cut_first_after=n``: the first file response sends its full Content-Length but
      only ``n`` body bytes, then drops the connection (an interrupted download).
    - ``ignore_range``: answer Range requests with 200 and the whole file, as servers
      without Range support do.
    - ``stall_first=s``: the first file response waits ``s`` seconds after its headers
      (a read timeout).
    - ``range_answer=(status, content_range)``: answer Range requests with that status and
      Content-Range (``{start}``, ``{end}`` and ``{length}`` filled in; None: no Content-Range) and the
      bytes asked for, as a misbehaving server might.
    """

    def __init__(
        self,
        root: Path,
        *,
        cut_first_after: int | None = None,
        ignore_range: bool = False,
        stall_first: float = 0.0,
        range_answer: tuple[int, str | None] = (206, "bytes {start}-{end}/{length}"),
    ) -> None:
        self.root = root
        self.cut_first_after = cut_first_after
        self.ignore_range = ignore_range
        self.stall_first = stall_first
        self.range_answer = range_answer
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._served = 0
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def start(self) -> FileServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def __enter__(self) -> FileServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _first_response(self) -> bool:
        with self._lock:
            self._served += 1
            return self._served == 1

    def _log(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)


def free_port() -> int:
    """A 127.0.0.1 port nothing listens on (until someone binds it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def dead_url(name: str = "archive.tar.gz") -> str:
    """A URL on 127.0.0.1 whose port has nothing listening: connecting is refused."""
    return f"http://127.0.0.1:{free_port()}/{name}"


def _make_handler(server: FileServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass  # keep test output clean; Request records what happened

        def do_GET(self) -> None:
            path = unquote(urlparse(self.path).path)
            file = server.root / path.lstrip("/")
            range_header = self.headers.get("Range")
            # Each request is logged before its answer goes out: a client that has its answer finds it logged.
            if not file.is_file() or not file.resolve().is_relative_to(server.root.resolve()):
                server._log(Request(path, range_header, 404, 0))
                self.send_error(404)
                return
            data = file.read_bytes()
            start, end = 0, len(data)
            status = 200
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", range_header or "")
            if match and not server.ignore_range:
                start = int(match[1])
                end = min(int(match[2]) + 1, len(data)) if match[2] else len(data)
                if start >= len(data):
                    server._log(Request(path, range_header, 416, 0))
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = server.range_answer[0]
            body = data[start:end]
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "none" if server.ignore_range else "bytes")
            if match and not server.ignore_range and server.range_answer[1] is not None:
                self.send_header("Content-Range", server.range_answer[1].format(start=start, end=end - 1,
                                                                                length=len(data)))
            self.end_headers()
            first = server._first_response()
            if first and server.stall_first:
                time.sleep(server.stall_first)
            if first and server.cut_first_after is not None:
                body = body[: server.cut_first_after]
            server._log(Request(path, range_header, status, len(body)))
            try:
                self.wfile.write(body)
                self.wfile.flush()
            except OSError:
                pass  # the client gave up (a timeout test): nothing to serve any more
            # With HTTP/1.0 the connection closes here, so a cut body stays short.
            self.close_connection = True

    return Handler
