"""Resident memory of this process, for the benchmarks (Linux: /proc and ru_maxrss in KiB)."""
from __future__ import annotations

import resource

__all__ = ["rss_mb", "peak_rss_mb"]


def rss_mb() -> float:
    """Current resident set size in MB (NaN where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
