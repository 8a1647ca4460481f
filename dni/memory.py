"""The C allocator's handling of large buffers, for loops that allocate the same ones again.

A training step allocates tens of MB of fresh buffers (states, activated gates, gradients
of the pre-activations) and frees them at its end. glibc serves such blocks from mmap, or
trims them off the heap when freed, so the next step gets fresh pages from the kernel and
pays a page fault for every 4 KB of them: 11-14% of a strokes LSTM step on this CPU.
:func:`keep_freed_memory` makes glibc keep up to ``TRIM`` bytes of freed memory for reuse
instead. It changes where memory comes from, never a computed value.
"""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: Blocks up to this size come from the heap (glibc's maximum on 64-bit systems).
MMAP_THRESHOLD = 32 << 20
#: Free memory kept at the top of the heap before glibc gives it back to the system.
TRIM = 256 << 20

_done: bool | None = None


def keep_freed_memory() -> bool:
    """Apply the setting to this process (once); False where the C library is not glibc."""
    global _done
    if _done is None:
        _done = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None)
                mallopt = libc.mallopt
                mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
                # Both together: setting either one alone stops glibc from raising the mmap
                # threshold by itself, and every large block would then be mmapped.
                _done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM))
            except (OSError, AttributeError):
                _done = False
    return _done
