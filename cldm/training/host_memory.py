"""Host memory for training on the CPU: keep freed memory in the process, as CUDA's caching allocator does.

PyTorch allocates CPU tensors with the C library's `malloc`. glibc serves blocks of 32 MiB and more (the
gradients and oneDNN's reordered copies of the large convolution weights, every step) from fresh `mmap`s and
returns them to the system when they are freed, and it returns the top of its heap too; the next step then pays
the kernel for mapping and zeroing the same memory again, a large share of a CPU training step. Retaining freed
memory makes each step reuse what the last one freed. The heap settles after a few steps, near the step's own
peak (the gaps fragmentation leaves are kept too), and the process does not give memory back while it runs.
"""
from __future__ import annotations

import ctypes
import platform

# mallopt parameters, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# M_TRIM_THRESHOLD -1 turns trimming off (mallopt(3)); M_MMAP_MAX 0 serves every block from the heap.
NO_TRIMMING = -1
NO_MMAP_BLOCKS = 0


def retain_freed_host_memory() -> bool:
    """Make glibc's malloc keep the memory tensors free for the next allocations of this process.

    Applies from the next allocation on; returns False, changing nothing, where the C library is not glibc.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)  # the C library this process already runs on
    return bool(libc.mallopt(M_MMAP_MAX, NO_MMAP_BLOCKS)) and bool(libc.mallopt(M_TRIM_THRESHOLD, NO_TRIMMING))
