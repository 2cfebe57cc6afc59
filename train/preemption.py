"""SIGTERM, SIGHUP, SIGQUIT and Ctrl-C as requests to checkpoint and stop, agreed by every
process at one step."""

from __future__ import annotations

import faulthandler
import os
import signal
import socket
import threading
from typing import Callable

import jax
from absl import logging
from jax.experimental import multihost_utils


class Preempted(BaseException):
  """A notice (SIGTERM, SIGHUP, SIGQUIT) arrived before training started: nothing to save, so
  the run stops at once, with exit code 128 + the signal's number, as if it had killed us.

  A BaseException, like KeyboardInterrupt, so that no library's `except Exception` swallows it.
  """

  def __init__(self, message: str, exit_code: int = 128 + signal.SIGTERM):
    super().__init__(message)
    self.exit_code = exit_code


class Interrupted(Preempted):
  """Ctrl-C (SIGINT) arrived before training started: nothing to save, so the run stops."""

  def __init__(self, message: str):
    super().__init__(message, EXIT_INTERRUPTED)


EXIT_INTERRUPTED = 130  # Ctrl-C: 128 + SIGINT, what shells and schedulers expect

# The signals that ask a run to checkpoint and stop, as a scheduler's SIGTERM does, and what
# each means in the line that reports the checkpoint. SIGHUP: the terminal or SSH session that
# started the run closed. SIGQUIT (Ctrl-\): a user debugging a stuck run; every thread's stack
# is dumped first (faulthandler, which works while the main thread is inside XLA).
NOTICES = {signal.SIGTERM: "a preemption notice (SIGTERM)",
           signal.SIGHUP: "SIGHUP (the terminal closed)",
           signal.SIGQUIT: "SIGQUIT (the stacks of every thread are above)"}

_START_UP = ("{} during start-up, before the first step: nothing was saved. Rerun the same "
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


def stopped_text(step: int, finished: bool = False) -> str:
  """The line a run prints after checkpointing `step` for a Ctrl-C (`finished`: it came during
  the final save or evaluation, which completed)."""
  if finished:
    return (f"Ctrl-C after the last step: the run is complete, its final checkpoint (step "
            f"{step}) and evaluation were written.")
  return f"Checkpointed step {step} after Ctrl-C; rerun the same command to resume."


class Preemption:
  """Where the process should stop for a notice (SIGTERM, SIGHUP, SIGQUIT) or a Ctrl-C (SIGINT).

  With a distributed runtime, JAX's preemption service owns SIGTERM: the notice reaches every
  process, and `reached_preemption_sync_point` turns True on all of them at the same step (the
  highest step any process has reported, plus one), so their collective save cannot deadlock.
  A Ctrl-C, SIGHUP or SIGQUIT there is passed on to that service as a SIGTERM to this process,
  so it stops every process at one step too. Without one, Python handlers record the signal:
  during start-up they stop at once (there is nothing to save), inside the loop at the next
  step boundary. A SIGHUP that its parent set to be ignored (`nohup`) stays ignored.

  A second Ctrl-C stops the process at once (exit 130): a checkpoint being written is left as
  orbax's temporary directory, which the next run deletes, so the newest committed checkpoint
  stays the one to resume from. It works even while the main thread is inside XLA or a save,
  where Python signal handlers cannot run: a thread watches the signal wakeup fd.
  """

  def __init__(self):
    self.distributed = jax.distributed.is_initialized()
    self.requested = False
    self.interrupted = False  # the notice was a Ctrl-C (exit 130), not a SIGTERM
    self.notice = signal.SIGTERM  # which notice arrived (the first one)
    self.training = False
    self._previous: dict[int, object] = {}
    self._previous_wakeup = None
    self._wakeup: tuple[socket.socket, socket.socket] | None = None
    self._watcher_interrupts = 0
    if threading.current_thread() is not threading.main_thread():
      return  # signal handlers can only be set from the main thread
    for signum in NOTICES:
      if signum == signal.SIGTERM and self.distributed:
        continue  # JAX's preemption service handles it
      if signum == signal.SIGHUP and signal.getsignal(signum) is signal.SIG_IGN:
        continue
      self._previous[signum] = signal.signal(signum, self._handle)
    if signal.SIGQUIT in self._previous:
      # Dumped from C at once, then chained to the Python handler above.
      faulthandler.register(signal.SIGQUIT, file=2, all_threads=True, chain=True)
    self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._handle_int)
    self._watch_wakeup_fd()

  def _handle(self, signum, frame) -> None:
    del frame
    name = signal.Signals(signum).name
    if signum == signal.SIGHUP:
      _drop_hung_up_terminal()
    if not self.requested:
      self.notice = signal.Signals(signum)
    if self.distributed:  # a SIGHUP or SIGQUIT: JAX's preemption service owns SIGTERM
      os.kill(os.getpid(), signal.SIGTERM)
      logging.warning("%s: every process checkpoints and stops at the same step.", name)
      return
    self.requested = True
    if not self.training:
      raise Preempted(_START_UP.format(name), 128 + signum)
    logging.warning("%s: saving a checkpoint and stopping after this step.", name)

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
    """From now on a notice or Ctrl-C checkpoints at the next step boundary instead of stopping."""
    if self.requested:  # the handler's exception can be swallowed (raised inside a __del__)
      if self.interrupted:
        raise Interrupted(_CTRL_C_START_UP)
      raise Preempted(_START_UP.format(self.notice.name), 128 + self.notice)
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
    message(f"Checkpointed step {step} after {NOTICES[self.notice]}; rerun the same command "
            f"to resume.")
    logging.warning("Preempted: checkpointed step %d; exiting.", step)

  def close(self) -> None:
    """Reinstates the previous signal handlers."""
    if signal.SIGQUIT in self._previous:
      faulthandler.unregister(signal.SIGQUIT)
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}
    if self._wakeup is not None:
      signal.set_wakeup_fd(self._previous_wakeup if self._previous_wakeup is not None else -1)
      reader, writer = self._wakeup
      writer.close()
      reader.shutdown(socket.SHUT_RDWR)  # ends the watcher's recv
      reader.close()
      self._wakeup = None


def _drop_hung_up_terminal() -> None:
  """Points stdout and stderr at /dev/null where they are a terminal that hung up: every write
  there fails (EIO), and a failed print must not stop the checkpoint the SIGHUP asks for."""
  for fd in (1, 2):
    try:
      os.write(fd, b"")
    except OSError:
      null = os.open(os.devnull, os.O_WRONLY)
      os.dup2(null, fd)
      os.close(null)


_stopping = threading.Lock()


def _stop_now() -> None:
  """The second Ctrl-C: one line, exit 130, no cleanup (that is what the user asked to skip)."""
  if not _stopping.acquire(blocking=False):
    return  # the other path (handler or watcher) is already exiting
  say(_CTRL_C_TWICE)
  os._exit(EXIT_INTERRUPTED)
