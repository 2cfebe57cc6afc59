"""Compiling the steps: announced, timed, and kept in JAX's persistent cache across launches.

A relaunch (after a preemption, a crash, or simply the next run of the same config) loads the
compiled train and eval steps from the cache instead of compiling them again; on a TPU pod the
DenseNet-121 step takes minutes of host CPU to compile (`python -m train.plan` says how many).
Each host of a pod keeps its own directory (only process 0 writes); processes on one host
share it safely. One exception: XLA:CPU cannot serialize the oneDNN custom calls the CPU fast
path asks for (densenet_jax.backends; JAX 0.12 reports `std::bad_alloc`), so on CPU the train
step is compiled at every launch and the rest is cached.

The cache is an optimisation and never stops a run. A directory that cannot be made or read
turns it off with one warning. Each entry is written atomically and records its key and a
digest of its bytes: JAX's own files record neither, so a damaged entry was skipped with a
warning at every launch and never rewritten, and an entry copied over another's name loaded as
the wrong program (an AssertionError deep in JAX, or a silently wrong executable when the
signatures agree). Here such an entry counts as a miss: it is removed, the step is compiled,
the fresh entry takes its place, and the run says so once.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import time
import warnings
from typing import Any, Callable

import jax
from absl import logging
from jax.experimental.compilation_cache import compilation_cache as cc

try:  # JAX's cache hook is internal: without it, JAX's own (unchecked) file cache is used
  from jax._src import compilation_cache as _jax_cache
  from jax._src.compilation_cache_interface import CacheInterface
except ImportError:  # pragma: no cover - other JAX versions
  _jax_cache, CacheInterface = None, object

_hits = 0
_listening = False
_MAGIC = b"densenet-jax compiled step v1\n"
_SUFFIX = "-checked-cache"  # not JAX's "-cache": JAX's own files in the directory are ignored


def _count_hits(event: str, **_: Any) -> None:
  global _hits
  if event == "/jax/compilation_cache/cache_hits":
    _hits += 1


def _seal(key: str, value: bytes) -> bytes:
  """An entry as stored: a header naming the format and the key, value's digest, value."""
  return _MAGIC + key.encode() + b"\n" + hashlib.blake2b(value, digest_size=32).digest() + value


class CheckedCache(CacheInterface):
  """A directory of compiled executables, each stored with its key and blake2b digest."""

  def __init__(self, path: str):
    self._path = pathlib.Path(path)
    self._reported = False

  def _file(self, key: str) -> pathlib.Path:
    return self._path / f"{key}{_SUFFIX}"

  def get(self, key: str) -> bytes | None:
    """The entry stored under `key`; None if absent, unreadable or not this key's (removed)."""
    try:
      data = self._file(key).read_bytes()
    except OSError:  # absent, or unreadable: compiling is always correct
      return None
    value = data[len(_seal(key, b"")):]
    if data == _seal(key, value):
      return value
    self._discard(key)
    return None

  def put(self, key: str, value: bytes) -> None:
    """Stores `value` under `key`, replacing what is there; atomic for concurrent readers."""
    partial = self._path / f".{key}.{os.getpid()}.tmp"
    try:
      partial.write_bytes(_seal(key, value))
      os.replace(partial, self._file(key))
    except OSError:  # a read-only or full cache still serves what it holds
      with contextlib.suppress(OSError):
        partial.unlink(missing_ok=True)

  def clear(self) -> None:
    """Removes every entry."""
    for entry in self._path.glob(f"*{_SUFFIX}"):
      with contextlib.suppress(OSError):
        entry.unlink(missing_ok=True)

  def _discard(self, key: str) -> None:
    with contextlib.suppress(OSError):  # read-only: a miss at every launch, still correct
      self._file(key).unlink(missing_ok=True)
    if not self._reported:
      self._reported = True
      logging.warning("The compilation cache %s held a damaged entry (or another program's); "
                      "it is replaced by a fresh compile.", self._path)


def _usable(path: str) -> str | None:
  """Why `path` cannot hold the cache, or None if it can (it is created if missing)."""
  if os.path.exists(path) and not os.path.isdir(path):
    return "it is not a directory"
  try:
    os.makedirs(path, exist_ok=True)
    os.listdir(path)
  except OSError as e:
    return e.strerror or str(e)
  return None


def enable_cache(directory: str) -> str | None:
  """Points JAX's persistent compilation cache at `directory` ('' leaves it off); its path,
  or None (after one warning) where that directory cannot be used."""
  global _listening
  if not directory:
    return None
  path = os.path.abspath(os.path.expanduser(directory))
  problem = _usable(path)
  if problem is not None:
    logging.warning("Compilation cache off: cannot use %s (%s); every step is compiled. Set "
                    "--config.compilation_cache_dir to a writable directory, or '' to silence "
                    "this.", path, problem)
    disable_cache()
    return None
  cc.set_cache_dir(path)
  cc.reset_cache()  # JAX opens its cache once per process: reopen it at the new path
  if _jax_cache is not None and hasattr(_jax_cache, "_cache"):
    with _jax_cache._cache_initialized_mutex:  # pylint: disable=protected-access
      _jax_cache._cache = CheckedCache(path)  # pylint: disable=protected-access
      _jax_cache._cache_initialized = True  # pylint: disable=protected-access
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # the eval step too
  if not _listening:
    jax.monitoring.register_event_listener(_count_hits)
    # The CPU train step cannot be serialized (see above); JAX would say so at every launch.
    warnings.filterwarnings("ignore", message="Error writing persistent compilation cache")
    _listening = True
  return path


def disable_cache() -> None:
  """Turns the persistent cache off again for this process (tests, benchmarks)."""
  cc.set_cache_dir(None)
  cc.reset_cache()


def compile_step(name: str, jitted: Any, *args: Any,
                 say: Callable[[str], None] = print) -> Any:
  """`jitted` compiled for `args`, with one line before and one after (time, cache hit)."""
  say(f"Compiling the {name} step...")
  before, start = _hits, time.time()
  compiled = jitted.lower(*args).compile()
  source = " (loaded from the compilation cache)" if _hits > before else ""
  say(f"Compiled the {name} step in {time.time() - start:.1f} s{source}.")
  return compiled
