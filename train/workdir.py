"""The workdir: one writer at a time (a lock), and the resolved config of every launch."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import time
from typing import Iterator

from absl import logging
import jax
from etils import epath

from densenet_jax import locking
from train import distributed, errors

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


@contextlib.contextmanager
def hold(path: epath.Path) -> Iterator[None]:
  """An exclusive lock on a local workdir (`<workdir>/LOCK`, densenet_jax.locking) for the life
  of the run; WorkdirError names the run holding it."""
  if "://" in str(path):
    logging.warning("%s is not a local path: it cannot be locked, so make sure no other run "
                    "uses it.", path)
    yield
    return
  lock = contextlib.ExitStack()
  try:
    previous = lock.enter_context(locking.exclusive(path / LOCK_NAME))
  except locking.Busy as e:
    raise errors.WorkdirError(
        f"--workdir={path} is in use by another run ({e.holder}). Wait for it to finish, stop "
        f"it, or choose another --workdir.") from None
  except OSError as e:
    if e.errno == errno.ENOSPC:
      raise errors.DiskFullError(full_text(path)) from e
    raise errors.WorkdirError(
        f"Cannot write to --workdir={path}: {e.strerror or e}. Choose a writable directory (a "
        f"finished run on a read-only disk can still be evaluated with "
        f"--config.eval_only=True).") from e
  with lock:
    if previous:
      logging.warning("Taking over the lock of a run that is no longer alive (%s).", previous)
    yield


@contextlib.contextmanager
def locked(path: epath.Path, config_json: str) -> Iterator[None]:
  """Process 0 creates and locks the workdir and records the config; every process learns
  whether that worked (and raises if not); the lock is released on exit."""
  with contextlib.ExitStack() as lock:
    failure = None
    if jax.process_index() == 0:
      try:
        create(path)
        lock.enter_context(hold(path))
        write_config(path, config_json)
      except errors.UserError as e:
        failure = e
    if not distributed.from_process_0(failure is None) and failure is None:
      failure = errors.WorkdirError(f"Process 0 could not lock --workdir={path}; see its log.")
    if failure is not None:
      raise failure
    yield


def writable(path: epath.Path) -> bool:
  """Whether this process can create files in `path` (a finished run may sit on a read-only
  disk: it is evaluated without writing metrics)."""
  try:
    probe = path / f".write_probe_{jax.process_index()}"
    probe.write_text("")
    probe.unlink()
    return True
  except OSError:
    return False


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
