"""How this process's C heap (glibc's malloc, which PyTorch's CPU tensors come from) keeps freed memory.

By default glibc gives a freed block above its mmap threshold (at most 32 MiB) straight back to the
kernel, and trims the heap's free top beyond twice that. A forward pass frees and reallocates the same
large activations layer after layer (a SwiGLU's hidden state at a 4096-token chunk is 23 MiB), so
each one is faulted in again page by page: on this project's 2-core VMs that was about a million
minor faults per 16K-token prefill, and a SwiGLU block took 149 ms instead of 74 ms.
``retain_freed_memory`` keeps freed memory in the process for reuse instead (as jemalloc or tcmalloc,
which serving stacks preload, do); ``release_free_memory`` still hands it back on demand (before a
memory measurement). Elsewhere than glibc both do nothing.
"""

from __future__ import annotations

import ctypes
import gc

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
# Free memory at the heap's top beyond this goes back to the kernel: high enough that a forward pass's
# activations stay, while a process that shrinks for good (a server whose sequences all ended) still
# returns the rest at its next trim.
RETAINED_TOP = 1 << 30

_libc: ctypes.CDLL | None | bool = None


def libc() -> ctypes.CDLL | None:
    """glibc, or None where this is not glibc (musl, macOS, Windows)."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6")
            _libc.mallopt  # noqa: B018 (glibc has it; musl's libc.so.6 name does not exist)
        except (OSError, AttributeError):
            _libc = False
    return _libc or None


def retain_freed_memory() -> bool:
    """Serve large allocations from the heap and keep up to ``RETAINED_TOP`` of freed memory at its top,
    so that freed activations are reused rather than returned and faulted in again. True if applied."""
    c = libc()
    return bool(c and c.mallopt(M_MMAP_MAX, 0) and c.mallopt(M_TRIM_THRESHOLD, RETAINED_TOP))


def release_free_memory() -> None:
    """Return freed heap memory to the OS so the next RSS measurement starts from what is live."""
    gc.collect()
    c = libc()
    if c:
        c.malloc_trim(0)
