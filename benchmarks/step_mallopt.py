"""step_cpu_util.py with glibc's arena_max=1, mmap_max=0, trim_threshold=2^31-1 set by mallopt in-process."""
import ctypes, ctypes.util, os
libc = ctypes.CDLL(ctypes.util.find_library("c"))
print([libc.mallopt(p, v) for p, v in ((-8, 1), (-4, 0), (-1, 2**31 - 1))])
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "step_cpu_util.py")).read())
