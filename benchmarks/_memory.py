"""Process memory readings shared by the benchmark scripts (Linux)."""

from __future__ import annotations

import resource


def rss_mib() -> float:
    """Current resident set size, from /proc/self/statm."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def peak_mib() -> float:
    """Peak resident set size of this process so far (``ru_maxrss``)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
