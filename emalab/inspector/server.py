"""The inspector's HTTP layer: the standard library's threaded ``http.server``, loopback only.

Routes (JSON unless noted):

* ``GET /`` and ``GET /static/<file>`` — the page (HTML/CSS/JS, no external assets).
* ``GET /api/meta`` — model, layers, concepts, domains, adapter, vector sources, limits.
* ``GET /api/prompts?domain=D`` — the suite's eval-split prompts of ``D``.
* ``GET /api/status`` — whether an inspection is running, and its phase.
* ``POST /api/inspect`` ``{prompt, ablate, steer: {concept, layer, coeff} | null}``.

Errors answer ``{"error": message}`` with a 4xx status; the server keeps serving. Each connection has a
socket timeout (a client that sends half a request is dropped), at most ``workers`` requests are
served at once (more get a 503), and with a token (for shared machines) every API request must carry
it in an ``X-Emalab-Token`` header; the page takes it once from ``/?token=...``. The request log
has one line per request: method, path, status and latency, never a body — prompts and the
generated answers to harmful prompts stay in the page.
"""

from __future__ import annotations

import hmac
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
SOCKET_TIMEOUT_S = 30.0
"""Seconds a connection may sit idle or mid-request before it is closed."""
MAX_WORKERS = 8
"""Requests served at once; one inspection runs at a time anyway, the rest are cheap reads."""
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

    def __init__(self, address, service: InspectorService, log=None, token: str | None = None,
                 workers: int = MAX_WORKERS, timeout: float = SOCKET_TIMEOUT_S) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        if workers < 1 or not timeout > 0:
            raise ValueError(f"workers must be >= 1 and timeout > 0, got {workers} and {timeout}")
        if token is not None and len(token) < 16:
            raise ValueError("the inspector token must be at least 16 characters; e.g. python -c "
                             "'import secrets; print(secrets.token_urlsafe())'")
        super().__init__(address, _Handler)
        self.service = service
        self.token = token
        self.request_timeout = timeout
        self._slots = threading.BoundedSemaphore(workers)
        self.log = log if log is not None else (lambda line: print(line, file=sys.stderr, flush=True))

    def process_request(self, request, client_address) -> None:
        # A bounded pool: a flood of connections gets a 503 instead of one thread each.
        if not self._slots.acquire(blocking=False):
            try:
                request.settimeout(1.0)
                body = b'{"error": "the inspector is busy; retry in a moment", "status": 503}'
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                b"Retry-After: 1\r\nConnection: close\r\nContent-Length: "
                                + str(len(body)).encode() + b"\r\n\r\n" + body)
            except OSError:
                pass
            self.shutdown_request(request)
            self.log("busy: refused a connection with 503")
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def make_server(service: InspectorService, host: str = "127.0.0.1", port: int = 8765, log=None,
                token: str | None = None, workers: int = MAX_WORKERS,
                timeout: float = SOCKET_TIMEOUT_S) -> InspectorServer:
    """Bind (loopback only) without serving yet; ``port=0`` picks a free port.

    Args:
        token: when set, API requests must send it as ``X-Emalab-Token`` (other local users cannot
            drive the model); open the page as ``/?token=...``.
        workers: requests served at once; more get a 503.
        timeout: socket timeout of each connection, in seconds.
    """
    return InspectorServer((check_loopback(host), port), service, log, token=token, workers=workers, timeout=timeout)


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

    def setup(self) -> None:
        self.timeout = self.server.request_timeout  # StreamRequestHandler applies it to the socket
        super().setup()

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
        if self.server.token is not None and urlsplit(self.path).path.startswith("/api/"):
            given = self.headers.get("X-Emalab-Token") or ""
            if not hmac.compare_digest(given.encode(), self.server.token.encode()):
                self._drain_quietly()
                self._error(HTTPStatus.UNAUTHORIZED, "this inspector needs its token: open the page as "
                                                     "/?token=TOKEN or send the X-Emalab-Token header")
                return
        try:
            handler()
        except RequestError as err:
            self._error(err.status, str(err))
        except FloatingPointError as err:
            self._error(HTTPStatus.UNPROCESSABLE_ENTITY, f"{err} (try a smaller coefficient)")
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
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
        except (ValueError, RecursionError) as err:
            # ValueError covers bad UTF-8, bad JSON and numbers too long to convert; RecursionError deep nesting.
            raise RequestError(f"the body is not valid JSON ({type(err).__name__}); send a JSON object like "
                               '{"prompt": "..."}') from err
        service = self.server.service
        req = service.parse(data)
        result = service.inspect(req)
        self._compute = (result["seconds"], result["cpu_seconds"])
        self._json(200, result)

    def _content_length(self) -> int:
        raw = (self.headers.get("Content-Length") or "0").strip()
        if not (raw.isascii() and raw.isdigit()):  # int() would also take "1_0", " 7", "٣"
            self.close_connection = True
            raise RequestError("bad Content-Length; send a byte count")
        return int(raw)

    def _drain_quietly(self) -> None:
        try:
            self._drain()
        except RequestError:
            self.close_connection = True

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
        body = self.rfile.read(n)
        if len(body) < n:
            self.close_connection = True
            raise RequestError(f"the body ended after {len(body)} of {n} bytes (Content-Length)")
        return body
