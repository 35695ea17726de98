"""tools/benchmark/cpu_heap.py: the benchmarks' held glibc heap.

Each case runs in a subprocess, since the thresholds are the process's."""
import platform
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARK_DIR = Path(__file__).resolve().parents[2] / 'tools/benchmark'

# Frees 40 heap blocks of 512 KiB after a 1 MiB block has raised glibc's
# adaptive trim threshold to about 2 MiB; prints the heap's size (mallinfo2's
# arena) at its peak and after the frees, in KiB.
SCRIPT = '''
import ctypes, sys
sys.path.insert(0, sys.argv[1])
from cpu_heap import hold_heap
print(hold_heap(adaptive=sys.argv[2] == 'adaptive'))
libc = ctypes.CDLL('libc.so.6')
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        'arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks', 'fsmblks',
        'uordblks', 'fordblks', 'keepcost')]
libc.mallinfo2.restype = MallInfo2
libc.free(libc.malloc(1 << 20))
blocks = [libc.malloc(512 << 10) for _ in range(40)]
for block in blocks:
    ctypes.memset(block, 1, 512 << 10)
peak = libc.mallinfo2().arena
for block in reversed(blocks):
    libc.free(block)
print(peak >> 10, libc.mallinfo2().arena >> 10)
'''


def heap_after_frees(mode):
    out = subprocess.run(
        [sys.executable, '-c', SCRIPT, str(BENCHMARK_DIR), mode],
        capture_output=True, text=True, check=True).stdout.splitlines()
    peak, after = map(int, out[1].split())
    return out[0], peak, after


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc',
                    reason='the thresholds are glibc\'s')
def test_held_heap_keeps_freed_blocks():
    line, peak, after = heap_after_frees('held')
    assert line.startswith('glibc heap held')
    assert peak >= 20 << 10, f'the blocks did not come from the heap: {peak} KiB'
    assert after == peak, f'the heap was trimmed: {peak} -> {after} KiB'


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc',
                    reason='the thresholds are glibc\'s')
def test_adaptive_heap_trims_as_glibc_does():
    # the case the held heap avoids: without it the same frees trim the heap
    line, peak, after = heap_after_frees('adaptive')
    assert 'adaptive' in line
    assert after < peak - (16 << 10), f'no trim: {peak} -> {after} KiB'
