"""SIGTERM and Ctrl-C as requests to checkpoint and stop, agreed by every process at one step."""

from __future__ import annotations

import os
import signal
import socket
import threading
from typing import Callable

import jax
from absl import logging
from jax.experimental import multihost_utils


class Preempted(BaseException):
  """SIGTERM arrived before training started: nothing to save, so the run stops at once.

  A BaseException, like KeyboardInterrupt, so that no library's `except Exception` swallows it.
  """


class Interrupted(Preempted):
  """Ctrl-C (SIGINT) arrived before training started: nothing to save, so the run stops."""


EXIT_PREEMPTED = 143  # SIGTERM before the first step: 128 + SIGTERM, as if it had killed us
EXIT_INTERRUPTED = 130  # Ctrl-C: 128 + SIGINT, what shells and schedulers expect

_START_UP = ("SIGTERM during start-up, before the first step: nothing was saved. Rerun the same "
             "command to start again.")
_CTRL_C_START_UP = ("Stopped by Ctrl-C before the first training step: nothing was saved. "
                    "Rerun the same command to start again.")
_CTRL_C_TWICE = ("Stopped at once by a second Ctrl-C, without waiting for the checkpoint being "
                 "written; the newest complete checkpoint is intact. Rerun the same command to "
                 "resume from it.")


def say(text: str) -> None:
  """Writes one line to stderr in one write, so concurrent lines (two quick Ctrl-Cs) never mix."""
  try:
    os.write(2, (text.rstrip("\n") + "\n").encode(errors="replace"))
  except OSError:  # stderr closed: the exit code still tells
    pass


def stopped_text(step: int) -> str:
  """The line a run prints after checkpointing `step` for a Ctrl-C."""
  return f"Checkpointed step {step} after Ctrl-C; rerun the same command to resume."


class Preemption:
  """Where the process should stop for a preemption notice (SIGTERM) or a Ctrl-C (SIGINT).

  With a distributed runtime, JAX's preemption service owns SIGTERM: the notice reaches every
  process, and `reached_preemption_sync_point` turns True on all of them at the same step (the
  highest step any process has reported, plus one), so their collective save cannot deadlock.
  A Ctrl-C there is passed on to that service as a SIGTERM to this process, so it stops every
  process at one step too. Without one, Python handlers record the signal: during start-up
  they stop at once (there is nothing to save), inside the loop at the next step boundary.

  A second Ctrl-C stops the process at once (exit 130): a checkpoint being written is left as
  orbax's temporary directory, which the next run deletes, so the newest committed checkpoint
  stays the one to resume from. It works even while the main thread is inside XLA or a save,
  where Python signal handlers cannot run: a thread watches the signal wakeup fd.
  """

  def __init__(self):
    self.distributed = jax.distributed.is_initialized()
    self.requested = False
    self.interrupted = False  # the notice was a Ctrl-C (exit 130), not a SIGTERM
    self.training = False
    self._previous = None
    self._previous_int = None
    self._previous_wakeup = None
    self._wakeup: tuple[socket.socket, socket.socket] | None = None
    self._watcher_interrupts = 0
    if threading.current_thread() is not threading.main_thread():
      return  # signal handlers can only be set from the main thread
    if not self.distributed:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    self._previous_int = signal.signal(signal.SIGINT, self._handle_int)
    self._watch_wakeup_fd()

  def _handle(self, signum, frame) -> None:
    del signum, frame
    self.requested = True
    if not self.training:
      raise Preempted(_START_UP)
    logging.warning("SIGTERM: saving a checkpoint and stopping after this step.")

  def _handle_int(self, signum, frame) -> None:
    del signum, frame
    if self.interrupted:
      _stop_now()
    self.interrupted = True
    if self.distributed:
      # JAX's preemption service agrees on one step for every process; it listens for SIGTERM.
      os.kill(os.getpid(), signal.SIGTERM)
      logging.info("Ctrl-C: every process checkpoints and stops at the same step.")
      return
    self.requested = True
    if not self.training:
      raise Interrupted(_CTRL_C_START_UP)
    logging.info("Ctrl-C: saving a checkpoint and stopping after this step.")

  def _watch_wakeup_fd(self) -> None:
    """Counts SIGINTs from a thread, which runs while the main thread is blocked in C++."""
    try:
      reader, writer = socket.socketpair()
      writer.setblocking(False)
      self._previous_wakeup = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    except (OSError, ValueError):
      return
    self._wakeup = (reader, writer)
    threading.Thread(target=self._watch, args=(reader,), name="ctrl-c-watcher",
                     daemon=True).start()

  def _watch(self, reader: socket.socket) -> None:
    while True:
      try:
        data = reader.recv(64)
      except OSError:
        return
      if not data:
        return
      self._watcher_interrupts += data.count(bytes([signal.SIGINT]))
      if self._watcher_interrupts >= 2:
        _stop_now()

  def start_training(self) -> None:
    """From now on a SIGTERM or Ctrl-C checkpoints at the next step boundary instead of stopping."""
    if self.requested:  # the handler's exception can be swallowed (raised inside a __del__)
      raise Interrupted(_CTRL_C_START_UP) if self.interrupted else Preempted(_START_UP)
    self.training = True

  def reached(self, step: int) -> bool:
    """Whether to checkpoint and stop after `step`; call it at every step on every process."""
    if self.distributed:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def report_stop(self, step: int, message: Callable[[str], None]) -> None:
    """Says that the run checkpointed `step` and stops (`message` prints on process 0).

    After a Ctrl-C, `train.main` prints the one line (stopped_text) and exits 130.
    """
    if self.interrupted:
      logging.info("Ctrl-C: checkpointed step %d; exiting.", step)
      return
    message(f"Checkpointed step {step} after a preemption notice (SIGTERM); rerun the same "
            f"command to resume.")
    logging.warning("Preempted: checkpointed step %d; exiting.", step)

  def close(self) -> None:
    """Reinstates the previous SIGTERM and SIGINT handlers."""
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
    if self._previous_int is not None:
      signal.signal(signal.SIGINT, self._previous_int)
      self._previous_int = None
    if self._wakeup is not None:
      signal.set_wakeup_fd(self._previous_wakeup if self._previous_wakeup is not None else -1)
      reader, writer = self._wakeup
      writer.close()
      reader.shutdown(socket.SHUT_RDWR)  # ends the watcher's recv
      reader.close()
      self._wakeup = None


_stopping = threading.Lock()


def _stop_now() -> None:
  """The second Ctrl-C: one line, exit 130, no cleanup (that is what the user asked to skip)."""
  if not _stopping.acquire(blocking=False):
    return  # the other path (handler or watcher) is already exiting
  say(_CTRL_C_TWICE)
  os._exit(EXIT_INTERRUPTED)
