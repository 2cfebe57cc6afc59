"""Lets each training step reuse the last step's host memory instead of faulting it in again."""

import ctypes
import ctypes.util
import platform

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NEVER_TRIM = 2**31 - 1  # mallopt takes an int: keep a free top chunk of up to 2 GiB


def keep_freed_memory() -> bool:
  """Makes glibc keep freed memory for reuse; True where it applied (glibc), else False.

  XLA:CPU allocates an executable's temporary buffer (1.1 GiB for BC-100 at batch 64) at
  every call and frees it after. glibc serves a request that large with a fresh mmap and
  unmaps it on free, so every step faults its ~270k pages back in and the kernel zeroes
  them: 15% of the step's CPU time (docs/performance.md, session 8). One arena (XLA
  allocates on worker threads, whose arenas cannot hold such a buffer and fall back to
  mmap), no mmap and no trimming let the next step reuse the same pages. Call it before
  other threads start: a thread that has already allocated keeps its own arena.
  """
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  libc = ctypes.CDLL(ctypes.util.find_library("c"))
  return all(libc.mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM)))
