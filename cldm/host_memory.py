"""Host memory: keep freed memory in the process for training on the CPU, as CUDA's caching allocator does, or give it
back at once for the checkpoint tools.

PyTorch allocates CPU tensors with the C library's `malloc`. glibc serves blocks of 32 MiB and more (the
gradients and oneDNN's reordered copies of the large convolution weights, every step) from fresh `mmap`s and
returns them to the system when they are freed, and it returns the top of its heap too; the next step then pays
the kernel for mapping and zeroing the same memory again, a large share of a CPU training step. Retaining freed
memory makes each step reuse what the last one freed. The heap settles after a few steps, near the step's own
peak (the gaps fragmentation leaves are kept too), and the process does not give memory back while it runs.

The checkpoint tools want the opposite: they keep the output's tensors while freeing the inputs they were computed
from, and glibc, which raises its mmap threshold (up to 32 MiB) each time it frees a mapped block, would serve
those tensors from its heap, where the freed ones leave gaps that stay resident (0.35 GB on an SD1.5 transfer).
"""
from __future__ import annotations

import ctypes
import platform

# mallopt parameters, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
# M_TRIM_THRESHOLD -1 turns trimming off (mallopt(3)); M_MMAP_MAX 0 serves every block from the heap.
NO_TRIMMING = -1
NO_MMAP_BLOCKS = 0
# glibc's initial mmap threshold; setting it explicitly keeps it there.
FIXED_MMAP_THRESHOLD_BYTES = 128 * 1024


def _glibc() -> ctypes.CDLL | None:
    """The C library this process already runs on, if it is glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(None)


def retain_freed_host_memory() -> bool:
    """Make glibc's malloc keep the memory tensors free for the next allocations of this process.

    Applies from the next allocation on; returns False, changing nothing, where the C library is not glibc.
    """
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_MAX, NO_MMAP_BLOCKS)) and bool(libc.mallopt(M_TRIM_THRESHOLD, NO_TRIMMING))


def return_freed_host_memory() -> bool:
    """Make glibc's malloc serve every block of 128 KiB or more from its own mmap, given back to the system when it
    is freed, for the rest of the process (what the checkpoint tools want).

    Returns False, changing nothing, where the C library is not glibc.
    """
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(M_MMAP_THRESHOLD, FIXED_MMAP_THRESHOLD_BYTES))
