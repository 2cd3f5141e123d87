"""Process-level tuning applied when voxreg is imported.

Large 3D registrations allocate and free buffers of tens to hundreds of megabytes at every call.
glibc serves such blocks with ``mmap`` and returns them with ``munmap``, so each new buffer costs a
page fault per 4 KiB page when it is first touched: on a 2-core machine that kernel time was about
half the CPU time of a 7-step 3D integration. Keeping large blocks in the heap (no ``mmap`` for
them, and freed memory kept up to a bound instead of trimmed) removes it.

This changes the allocator of the whole process, which is why it is done only on Linux with glibc,
can be turned off with the environment variable ``VOXREG_MALLOC_TUNING=0`` (read at import), and
keeps at most ``trim_threshold`` bytes of freed memory in the process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4

_state = {"tuned": False}


def tune_allocator(trim_threshold: int = 1 << 30, top_pad: int = 64 << 20) -> bool:
    """Keep large blocks in glibc's heap to avoid page faults on buffer reuse.

    Returns True when the settings were applied (Linux with glibc), False otherwise.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = (
            libc.mallopt(_M_MMAP_MAX, 0)
            and libc.mallopt(_M_TRIM_THRESHOLD, int(min(trim_threshold, 2**31 - 1)))
            and libc.mallopt(_M_TOP_PAD, int(min(top_pad, 2**31 - 1)))
        )
    except (OSError, AttributeError):
        return False
    _state["tuned"] = bool(ok)
    return bool(ok)


def allocator_tuned() -> bool:
    """Whether :func:`tune_allocator` is in effect in this process."""
    return _state["tuned"]


def _apply_default() -> None:
    if os.environ.get("VOXREG_MALLOC_TUNING", "1").strip().lower() not in ("0", "false", "no", "off"):
        tune_allocator()
