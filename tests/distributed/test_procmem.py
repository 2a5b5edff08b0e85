"""rlloop.distributed.procmem: the glibc malloc threshold, checked in a fresh interpreter (it changes the
allocator of the process it runs in)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from rlloop.distributed.procmem import set_malloc_mmap_threshold

PROBE = textwrap.dedent(
    """
    import ctypes, json
    import numpy as np
    from rlloop.distributed.procmem import set_malloc_mmap_threshold

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    out, keep = {}, []
    for mb in (16, 1):  # a 2 MiB block: on the heap under a 16 MiB threshold, mmapped under 1 MiB
        out[f"set_{mb}"] = set_malloc_mmap_threshold(mb << 20)
        before = libc.mallinfo2().hblks
        keep.append(np.ones(2 << 20, dtype=np.uint8))
        out[f"mapped_{mb}"] = libc.mallinfo2().hblks - before
    print(json.dumps(out))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_threshold_decides_whether_a_block_is_mmapped():
    import json

    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"set_16": True, "mapped_16": 0, "set_1": True, "mapped_1": 1}


def test_non_positive_threshold_is_refused():
    with pytest.raises(ValueError, match="> 0 bytes"):
        set_malloc_mmap_threshold(0)
