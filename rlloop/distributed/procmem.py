"""Peak resident memory of the current process, for the per-role `mem/<role>_rss_gb` metrics."""

from __future__ import annotations

import resource
import sys


def peak_rss_gb() -> float:
    """Peak RSS (high-water mark, like /proc/self/status VmHWM) of this process in GiB.

    getrusage is a syscall with no file parsing, so actors can answer it between real work for free.
    ru_maxrss is KiB on Linux and bytes on macOS.
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024
    return peak * scale / 2**30
