"""What this process holds of the machine: resident memory now and at its peak, in GB."""

from __future__ import annotations

import resource
import sys

__all__ = ["peak_rss_gb", "rss_gb"]


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far, in GB (Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1e9 if sys.platform == "darwin" else 1e6)


def rss_gb() -> float | None:
    """Resident memory now, in GB (``None`` where the platform does not say)."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is a dependency; a stripped environment may lack it
        return None
    return psutil.Process().memory_info().rss / 1e9
