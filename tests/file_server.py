"""A small HTTP file server on 127.0.0.1 for tests of LoRAs by URL.

Serves the files of one folder (over TLS when given a server context), counts GETs per path,
can answer slowly (so concurrent requests really overlap), redirects `/redirect?to=<url>` to any
URL, and serves `/nolength/<file>` without a Content-Length (the body ends when the connection
closes).
"""

from __future__ import annotations

import collections
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit


class FileServer:
    def __init__(self, folder: Path, delay_s: float = 0.0, tls: ssl.SSLContext | None = None):
        self.folder = Path(folder)
        self.delay_s = delay_s
        self.gets: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.scheme = "http" if tls is None else "https"
        if tls is not None:
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{self.scheme}://{host}:{port}"

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path.lstrip('/')}"

    def gets_of(self, path: str) -> int:
        with self._lock:
            return self.gets["/" + path.lstrip("/")]

    def __enter__(self) -> FileServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                parts = urlsplit(self.path)
                with server._lock:
                    server.gets[parts.path] += 1
                if parts.path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", parse_qs(parts.query)["to"][0])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                declare_length = not parts.path.startswith("/nolength/")
                name = parts.path.removeprefix("/nolength/").lstrip("/")
                file = server.folder / name
                if ".." in parts.path or not file.is_file():
                    self.send_error(404)
                    return
                data = file.read_bytes()
                time.sleep(server.delay_s)
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                if declare_length:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format, *args):  # keep test output quiet
                pass

        return Handler
