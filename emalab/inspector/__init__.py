"""``emalab inspect``: a local, offline, layer-by-layer inspector of one prompt in the browser.

:mod:`.vectors` finds or computes the directions, :mod:`.service` composes library calls into
JSON, :mod:`.server` serves the page and the JSON API on a loopback address.
"""

from .server import (
    STATIC_DIR,
    InspectorServer,
    NonLoopbackHostError,
    check_loopback,
    make_server,
    serve_in_thread,
)
from .service import InspectorConfig, InspectorService, RequestError
from .vectors import InspectorVectors, resolve_vectors

__all__ = [
    "STATIC_DIR",
    "InspectorConfig",
    "InspectorServer",
    "InspectorService",
    "InspectorVectors",
    "NonLoopbackHostError",
    "RequestError",
    "check_loopback",
    "make_server",
    "resolve_vectors",
    "serve_in_thread",
]
