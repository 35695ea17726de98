"""glibc's heap held steady for the CPU timings.

glibc gives the free top of its heap back to the system whenever it grows
past a trim threshold, and it adapts that threshold (and the size above which
blocks get their own mapping) to the blocks the process frees. In a rotation
of rows whose footprints range from a few MB to tens of MB, the trim, and
the page faults that refill the heap afterwards, land on whichever row frees
the block just below the free top, by the process: at C = 64, 56x56 a 28 MB
trim inside the AIK layer's backward added 2.5-3.2 ms to its 8.3 ms steps in
one process we caught, and in ratio_by_spell.py's rotation the convolution
ran 1-2 ms slower without fixed thresholds (docs/cpu_benchmark_notes.md).
With fixed thresholds the heap grows to the largest row's footprint and stays
there, so every row is timed on memory it has used before.
"""
import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's largest on 64-bit systems
TRIM_THRESHOLD = (1 << 31) - 1  # mallopt takes an int


def hold_heap(adaptive: bool = False) -> str:
    """Fixes glibc's mmap and trim thresholds for this process, unless
    ``adaptive``. Returns a line saying what the allocator does, for the
    timings' header."""
    if platform.libc_ver()[0] != 'glibc':
        return 'allocator: the platform\'s own (not glibc)'
    if adaptive:
        return 'glibc\'s adaptive heap thresholds (--adaptive-heap)'
    libc = ctypes.CDLL(ctypes.util.find_library('c'))
    if not (libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
            and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        raise RuntimeError('glibc refused mallopt(M_MMAP_THRESHOLD, 32 MiB) '
                           'or mallopt(M_TRIM_THRESHOLD, 2 GiB)')
    return ('glibc heap held: blocks up to 32 MiB from the heap, no trimming '
            '(--adaptive-heap keeps glibc\'s own thresholds)')
