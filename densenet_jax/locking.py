"""One process at a time: an exclusive `flock` on a file that names its holder.

The kernel releases an flock when its holder dies (even by kill -9), so a stale lock never
blocks anyone and a live one cannot be stolen. The holder writes who it is into the file, for
the message a waiter gets, and clears it on release. (The filelock package truncates the file
on every attempt, which would erase the record the message names.) Used by the weights hub (one
download per host) and by the trainer (one run per workdir).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import socket
import time
from typing import Callable, Iterator


class Busy(Exception):
  """Another live process holds the lock; `holder` says which."""

  def __init__(self, holder: str):
    super().__init__(holder)
    self.holder = holder


@contextlib.contextmanager
def exclusive(path: str | os.PathLike, timeout: float = 0.0,
              on_wait: Callable[[str], None] | None = None) -> Iterator[str]:
  """Holds the lock on `path` (created if missing), waiting at most `timeout` seconds.

  Yields the record a dead holder left behind ('' if none). Raises Busy naming the holder when
  the wait runs out; `on_wait(holder)` is called once if it has to wait. Opening the file can
  raise OSError (a read-only or full disk): the caller words that.
  """
  import fcntl  # POSIX only; imported here so that the library imports everywhere

  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    deadline = time.monotonic() + timeout
    while True:
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        break
      except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES):
          raise
        if time.monotonic() >= deadline:
          raise Busy(_describe(_read(fd))) from None
        if on_wait is not None:
          on_wait(_describe(_read(fd)))
          on_wait = None
        time.sleep(max(min(0.2, deadline - time.monotonic()), 0))
    previous = _read(fd)
    holder = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": datetime.datetime.now().isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    os.fsync(fd)
    try:
      yield _describe(previous) if previous else ""
    finally:
      os.ftruncate(fd, 0)  # a later waiter must not name a process that is gone
  finally:
    os.close(fd)  # closing releases the flock


def _read(fd: int) -> dict[str, object]:
  try:
    record = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
  except ValueError:
    return {}
  return record if isinstance(record, dict) else {}


def _describe(holder: dict[str, object]) -> str:
  if not holder:
    return "a process that has not written its name yet"
  return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started "
          f"{holder.get('started', '?')}")
