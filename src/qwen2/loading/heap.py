"""glibc's malloc set up for inference: activation-sized blocks reused from the heap, not mapped afresh.

glibc serves a block above its mmap threshold (128 KB at first) with a fresh mmap and unmaps it on free, so
each prompt activation (a 512-token MLP intermediate is 5 MB) has its pages faulted in again on every use.
Measured on a 512-token prefill: SiLU, mul and pow ~2.4x slower and the whole prefill ~10% slower than in a
process whose threshold had grown, which glibc does by itself once a mapped block is freed, so it depends on
what the process happened to free before (transformers' loader frees big temporaries; ours does not). Fixing
the threshold at glibc's own dynamic maximum (32 MB) makes it deterministic. Users who set
MALLOC_MMAP_THRESHOLD_ themselves, or use another allocator, are left alone.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD  # glibc's own ratio when it raises the threshold


@functools.cache
def reuse_large_blocks() -> bool:
    """Raise glibc's mmap threshold to 32 MB (once per process); False where it does not apply."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False  # musl or another C library: its allocator, its rules
    done = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(_M_TRIM_THRESHOLD,
                                                                                     TRIM_THRESHOLD))
    logger.debug("glibc mmap threshold %s", "raised to 32 MB" if done else "left as is (mallopt refused)")
    return done
