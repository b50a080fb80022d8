"""The inspector's HTTP layer: the standard library's threaded ``http.server``, loopback only.

Routes (JSON unless noted):

* ``GET /`` and ``GET /static/<file>`` — the page (HTML/CSS/JS, no external assets).
* ``GET /api/meta`` — model, layers, concepts, domains, adapter, vector sources, limits.
* ``GET /api/prompts?domain=D`` — the suite's eval-split prompts of ``D``.
* ``GET /api/status`` — whether an inspection is running, and its phase.
* ``POST /api/inspect`` ``{prompt, ablate, steer: {concept, layer, coeff} | null}``.

Errors answer ``{"error": message}`` with a 4xx status; the server keeps serving. The request log
has one line per request: method, path, status and latency, never a body — prompts and the
generated answers to harmful prompts stay in the page.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import sys
import threading
import time
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from .service import InspectorService, RequestError

__all__ = ["STATIC_DIR", "InspectorServer", "NonLoopbackHostError", "check_loopback", "make_server", "serve_in_thread"]

STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_BODY = 64 * 1024
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png"}
_STATIC_NAME = re.compile(r"^[A-Za-z0-9_-]+\.[a-z]+$")
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class NonLoopbackHostError(ValueError):
    """The inspector was asked to listen on an address other machines can reach."""


def check_loopback(host: str) -> str:
    """Return ``host`` if it is a loopback address (or ``localhost``), else raise.

    The page shows the model's answers to harmful prompts and has no authentication, so it is
    never exposed beyond this machine; reach it remotely through an SSH tunnel.
    """
    if host == "localhost":
        return host
    try:
        if ipaddress.ip_address(host).is_loopback:
            return host
    except ValueError:
        pass
    raise NonLoopbackHostError(
        f"refusing to listen on {host!r}: the inspector shows generations for harmful prompts and has no "
        "authentication, so it binds to loopback only (127.0.0.1, ::1 or localhost); for a remote machine use "
        "an SSH tunnel, e.g. ssh -L 8765:127.0.0.1:8765 HOST"
    )


class InspectorServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, service: InspectorService, log=None) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        self.service = service
        self.log = log if log is not None else (lambda line: print(line, file=sys.stderr, flush=True))

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def make_server(service: InspectorService, host: str = "127.0.0.1", port: int = 8765, log=None) -> InspectorServer:
    """Bind (loopback only) without serving yet; ``port=0`` picks a free port."""
    return InspectorServer((check_loopback(host), port), service, log)


def serve_in_thread(server: InspectorServer) -> threading.Thread:
    """Serve on a daemon thread (tests, notebooks); stop with ``server.shutdown()``."""
    thread = threading.Thread(target=server.serve_forever, name="emalab-inspector", daemon=True)
    thread.start()
    return thread


def _allowed_host(header: str | None) -> bool:
    """Guard against DNS rebinding: a page served from another name must not reach the API."""
    if not header:
        return False
    name = header.rsplit(":", 1)[0] if not header.endswith("]") else header
    name = name.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class _Handler(BaseHTTPRequestHandler):
    server: InspectorServer
    server_version = "emalab-inspector"
    sys_version = ""
    protocol_version = "HTTP/1.1"

    # -- plumbing -------------------------------------------------------------------------------
    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's signature
        pass  # the default logs the request line verbatim; we log our own line in _finish

    def _start(self) -> None:
        self._t0 = time.perf_counter()
        self._compute: tuple[float, float] | None = None

    def _finish(self, status: int) -> None:
        path = urlsplit(self.path).path
        if path == "/api/status" and status == 200:
            return  # the page polls it several times a second while computing
        line = f"{self.command} {path} {status} {1000 * (time.perf_counter() - self._t0):.0f}ms"
        if self._compute is not None:
            line += f" (inspection {self._compute[0]:.2f}s, cpu {self._compute[1]:.2f}s)"
        self.server.log(line)

    def _send(self, status: int, body: bytes, ctype: str, cache: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "max-age=60" if cache else "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", _CSP)
        self.send_header("Referrer-Policy", "no-referrer")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self._finish(status)

    def _json(self, status: int, data: dict) -> None:
        self._send(status, json.dumps(data, ensure_ascii=False, allow_nan=False).encode(), "application/json")

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message, "status": status})

    def _guarded(self, handler) -> None:
        self._start()
        if not _allowed_host(self.headers.get("Host")):
            self._error(HTTPStatus.FORBIDDEN, "the inspector only answers requests addressed to a loopback host")
            return
        try:
            handler()
        except RequestError as err:
            self._error(err.status, str(err))
        except FloatingPointError as err:
            self._error(HTTPStatus.UNPROCESSABLE_ENTITY, f"{err} (try a smaller coefficient)")
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as err:  # noqa: BLE001 - the server must survive any one request
            # The type and the innermost frame only: a message could quote the prompt.
            frame = traceback.extract_tb(err.__traceback__)[-1]
            self.server.log(f"internal error {type(err).__name__} at {Path(frame.filename).name}:{frame.lineno}")
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error ({type(err).__name__}); see the server log")

    # -- routes ---------------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._guarded(self._get)

    def do_HEAD(self) -> None:  # noqa: N802
        self._guarded(self._get)

    def do_POST(self) -> None:  # noqa: N802
        self._guarded(self._post)

    def _get(self) -> None:
        url = urlsplit(self.path)
        service = self.server.service
        if url.path in ("/", "/index.html"):
            self._static("index.html")
        elif url.path.startswith("/static/"):
            self._static(url.path.removeprefix("/static/"))
        elif url.path == "/api/meta":
            self._json(200, service.meta())
        elif url.path == "/api/status":
            self._json(200, service.status())
        elif url.path == "/api/prompts":
            query = parse_qs(url.query)
            self._json(200, service.prompts((query.get("domain") or [None])[0]))
        elif url.path == "/api/inspect":
            raise RequestError("use POST for /api/inspect", HTTPStatus.METHOD_NOT_ALLOWED)
        else:
            raise RequestError(f"no such path {url.path!r}", HTTPStatus.NOT_FOUND)

    def _static(self, name: str) -> None:
        # Only plain file names that exist in the static folder: no traversal, no listing.
        if not _STATIC_NAME.match(name) or not (STATIC_DIR / name).is_file():
            raise RequestError(f"no such file {name!r}", HTTPStatus.NOT_FOUND)
        path = STATIC_DIR / name
        self._send(200, path.read_bytes(), _TYPES.get(path.suffix, "application/octet-stream"), cache=False)

    def _post(self) -> None:
        url = urlsplit(self.path)
        if url.path != "/api/inspect":
            status = HTTPStatus.METHOD_NOT_ALLOWED if url.path in ("/api/meta", "/api/prompts", "/api/status") \
                else HTTPStatus.NOT_FOUND
            self._drain()
            raise RequestError(f"no POST route {url.path!r}", status)
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype != "application/json":
            # A JSON content type forces a CORS preflight, which we never grant: other sites' pages
            # cannot make this browser run the model.
            self._drain()
            raise RequestError("send the body as Content-Type: application/json", HTTPStatus.UNSUPPORTED_MEDIA_TYPE)
        body = self._read_body()
        try:
            data = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RequestError(f"the body is not valid JSON ({type(err).__name__})") from err
        service = self.server.service
        req = service.parse(data)
        result = service.inspect(req)
        self._compute = (result["seconds"], result["cpu_seconds"])
        self._json(200, result)

    def _content_length(self) -> int:
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError as err:
            raise RequestError("bad Content-Length") from err
        if n < 0:
            raise RequestError("bad Content-Length")
        return n

    def _drain(self) -> None:
        n = self._content_length()
        if n > MAX_BODY:
            self.close_connection = True
        elif n:
            self.rfile.read(n)

    def _read_body(self) -> bytes:
        n = self._content_length()
        if n > MAX_BODY:
            self.close_connection = True  # leave the unread body with a connection we are closing
            raise RequestError(f"the request body is {n} bytes; the limit is {MAX_BODY}", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        return self.rfile.read(n)
