"""Keep freed CPU memory in the process, so that a training step does not page-fault its tensors in anew.

PyTorch allocates CPU tensors with the C library's ``malloc``. glibc's malloc gives large blocks back
to the kernel when they are freed (``munmap``, or trimming the top of the heap), so a training step
that allocates the same large tensors every iteration page-faults all of them in again every
iteration. ``scripts/benchmark/fmp_step_overhead.py`` counts it (LSRB-6-64, batch 16, 2 threads):
40-44 K minor page faults per dense step and 34 K per FMP step, where FMP's largest tensors are
the hypernetwork's W2 gradients (15 MB for the 13 same-shape 64x64 3x3 convs, freed by ``zero_grad``
and allocated again by the next backward). In a microbenchmark of FMP's own per-step work the faults
took about half the time (issue 11, part 4).

PyTorch's performance tuning guide recommends a caching allocator for CPU training for this reason
(jemalloc or TCMalloc through ``LD_PRELOAD``; ``torch.backends.xeon.run_cpu`` configures jemalloc
never to give memory back). Those are not always installed, so :func:`keep_freed_memory` asks glibc
for the same with its own documented knobs (``mallopt``, see ``man 3 mallopt``):

* ``M_MMAP_THRESHOLD`` = 32 MiB (glibc's maximum on 64-bit): blocks below it come from the heap,
  where freed memory can be reused, instead of a fresh ``mmap`` each time;
* ``M_TRIM_THRESHOLD`` = 2 GiB - 1 (the largest ``mallopt`` takes): free memory at the top of the
  heap goes back to the kernel only beyond that.

What is kept is memory the next step allocates again; fragmentation may add a little to the peak (the
benchmark's dense training peak: 528 MB under glibc's defaults, 516-556 MB with these settings).

The settings are left alone (``applied: false``) when this is not glibc on Linux, or when the user has
chosen: any ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_TOP_PAD_`` environment
variable, ``glibc.malloc`` tunables in ``GLIBC_TUNABLES``, or another allocator in ``LD_PRELOAD``.
To keep glibc's own settings, set one of those variables (e.g. ``MALLOC_TRIM_THRESHOLD_=131072``, glibc's
default trim threshold).
"""
import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1   # glibc <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024     # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit glibc
TRIM_THRESHOLD = 2 ** 31 - 1          # mallopt takes an int
USER_SETTINGS = ('MALLOC_MMAP_THRESHOLD_', 'MALLOC_TRIM_THRESHOLD_', 'MALLOC_TOP_PAD_')
OTHER_ALLOCATORS = ('jemalloc', 'tcmalloc', 'mimalloc')

_result = None


def keep_freed_memory():
    """Set glibc's mmap and trim thresholds as described in the module docstring (once per process).

    Returns:
        dict: ``applied`` (bool), ``reason`` (str), and with ``applied`` the values set,
        ``mmap_threshold_bytes`` and ``trim_threshold_bytes``. Never raises: a platform without
        glibc's ``mallopt`` just gets ``applied: false``.
    """
    global _result
    if _result is None:
        _result = _apply()
    return dict(_result)


def _user_choice():
    for name in USER_SETTINGS:
        if name in os.environ:
            return f'{name} is set'
    if 'glibc.malloc' in os.environ.get('GLIBC_TUNABLES', ''):
        return 'GLIBC_TUNABLES sets glibc.malloc'
    preload = os.environ.get('LD_PRELOAD', '')
    for name in OTHER_ALLOCATORS:
        if name in preload:
            return f'LD_PRELOAD loads {name}'
    return None


def _apply():
    if not sys.platform.startswith('linux'):
        return {'applied': False, 'reason': f'not Linux ({sys.platform})'}
    choice = _user_choice()
    if choice is not None:
        return {'applied': False, 'reason': f'left to the user: {choice}'}
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
        gnu_get_libc_version = libc.gnu_get_libc_version
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return {'applied': False, 'reason': 'the C library is not glibc'}
    gnu_get_libc_version.restype = ctypes.c_char_p
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if not (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        return {'applied': False, 'reason': 'mallopt refused the values'}
    return {'applied': True, 'reason': f'glibc {gnu_get_libc_version().decode()} mallopt',
            'mmap_threshold_bytes': MMAP_THRESHOLD, 'trim_threshold_bytes': TRIM_THRESHOLD}
