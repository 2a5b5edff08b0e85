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


_M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def set_malloc_mmap_threshold(nbytes: int) -> bool:
    """glibc `mallopt(M_MMAP_THRESHOLD, nbytes)` for this process: blocks of `nbytes` and more get their own
    mapping, returned to the OS when freed. Under glibc's default the threshold is dynamic (it climbs to 32
    MiB after large frees), so activation-sized tensors land on the heap and fragment it.

    Affects allocations from now on (like the MALLOC_MMAP_THRESHOLD_ environment variable, which acts at
    process start). False, and nothing changed, where the C library is not glibc or glibc refuses the value.
    """
    if nbytes <= 0:
        raise ValueError(f"malloc mmap threshold must be > 0 bytes, got {nbytes}")
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(_M_MMAP_THRESHOLD, int(nbytes)) == 1
