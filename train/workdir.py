"""The workdir: one writer at a time (a lock), and the resolved config of every launch."""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import shutil
import socket
import time
from typing import Any

from absl import logging
from etils import epath

from train import errors

LOCK_NAME = "LOCK"


def resolve(workdir: str) -> epath.Path:
  """An absolute path (orbax rejects relative ones); cloud paths are kept as given."""
  if "://" in workdir:
    return epath.Path(workdir)
  return epath.Path(workdir).expanduser().resolve()


def create(path: epath.Path) -> None:
  """Creates the workdir, turning permission and disk errors into one actionable message."""
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise errors.WorkdirError(f"Cannot create --workdir={path}: {e.strerror or e}. Choose a "
                              f"writable directory.") from e


class Lock:
  """An exclusive lock on a local workdir, held for the life of the run.

  `flock` on `<workdir>/LOCK`: the kernel releases it when the holder dies (even by kill -9),
  so a stale lock never blocks anyone, and a live one cannot be stolen. The file records the
  holder (host, pid, start time) for the message a second run gets.
  """

  def __init__(self, path: epath.Path):
    self.path = path / LOCK_NAME
    self._fd: int | None = None

  def acquire(self) -> None:
    """Takes the lock or raises WorkdirError naming the run that holds it."""
    if "://" in str(self.path):
      logging.warning("%s is not a local path: it cannot be locked, so make sure no other run "
                      "uses it.", self.path.parent)
      return
    try:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      if e.errno == errno.ENOSPC:
        raise errors.DiskFullError(full_text(self.path.parent)) from e
      raise errors.WorkdirError(
          f"Cannot write to --workdir={self.path.parent}: {e.strerror or e}. Choose a writable "
          f"directory (a finished run on a read-only disk can still be evaluated with "
          f"--config.eval_only=True).") from e
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno not in (errno.EAGAIN, errno.EACCES):
        raise
      raise errors.WorkdirError(
          f"--workdir={self.path.parent} is in use by another run ({self._describe()}). Wait for "
          f"it to finish, stop it, or choose another --workdir.") from None
    previous = self._read(fd)
    if previous:
      logging.warning("Taking over the lock of a run that is no longer alive (%s).",
                      _holder_text(previous))
    holder = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": datetime.datetime.now().isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    os.fsync(fd)
    self._fd = fd

  def release(self) -> None:
    """Clears the holder record and releases the lock."""
    if self._fd is None:
      return
    os.ftruncate(self._fd, 0)
    os.close(self._fd)  # closing releases the flock
    self._fd = None

  def _describe(self) -> str:
    try:
      with open(self.path) as f:
        return _holder_text(json.loads(f.read() or "{}"))
    except (OSError, ValueError):
      return "holder unknown"

  @staticmethod
  def _read(fd: int) -> dict[str, Any]:
    try:
      return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except ValueError:
      return {}


def _holder_text(holder: dict[str, Any]) -> str:
  return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started "
          f"{holder.get('started', '?')}")


def full_text(path: epath.Path, needed: int | None = None) -> str:
  """The message for a full disk under `path`: free bytes (and needed ones, when known)."""
  try:
    free = f"{shutil.disk_usage(path).free:,} bytes free"
  except OSError:
    free = "no space left"
  need = f", a checkpoint needs about {needed:,}" if needed else ""
  return (f"The disk holding --workdir={path} is full ({free}{need}). Free space (or choose "
          f"another --workdir) and rerun the same command: it resumes from the newest complete "
          f"checkpoint.")


def write_config(path: epath.Path, config_json: str) -> None:
  """`config.json` (the latest launch) plus `configs/<timestamp>.json` (every launch)."""
  stamp = time.strftime("%Y%m%d-%H%M%S")
  history = path / "configs"
  try:
    history.mkdir(parents=True, exist_ok=True)
    (history / f"{stamp}-{os.getpid()}.json").write_text(config_json)
    tmp = path / "config.json.tmp"
    tmp.write_text(config_json)
    tmp.replace(path / "config.json")  # never a half-written config.json
  except OSError as e:
    if e.errno == errno.ENOSPC:
      raise errors.DiskFullError(full_text(path)) from e
    if isinstance(e, (NotADirectoryError, FileExistsError, PermissionError)) or e.errno == errno.EROFS:
      raise errors.WorkdirError(f"Cannot write the config into --workdir={path}: {e}. Choose a "
                                f"writable directory (or move what is in the way).") from e
    raise
